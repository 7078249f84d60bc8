//! A connection's `Session` stream for the CLI's bulk writers (`waft submit --lines`,
//! `waft bench`): shared by whoever writes through the connection, opened again by the first
//! writer to find it ended.

use super::connect::Conn;
use crate::pb::api::{self, waft_client::WaftClient};
use crate::pb::session::Pipe;
use std::sync::Arc;
use tonic::Status;

/// A session on one connection, opened on first use and again after it ends.
#[derive(Clone)]
pub struct Session {
    client: WaftClient<Conn>,
    pipe: Arc<tokio::sync::Mutex<Option<Pipe>>>,
}

impl Session {
    /// A session over `client`'s connection (opened by the first send).
    pub fn new(client: WaftClient<Conn>) -> Session {
        Session {
            client,
            pipe: Arc::default(),
        }
    }

    /// The client of the connection, for calls other than writes.
    pub fn client(&self) -> &WaftClient<Conn> {
        &self.client
    }

    async fn pipe(&self) -> Result<Pipe, Status> {
        let mut slot = self.pipe.lock().await;
        if let Some(pipe) = slot.as_ref().filter(|p| !p.is_broken()) {
            return Ok(pipe.clone());
        }
        let mut c = self.client.clone();
        let pipe = Pipe::open(|requests| async move { c.session(requests).await }).await?;
        *slot = Some(pipe.clone());
        Ok(pipe)
    }

    /// Sends `commands` as one request; one result per command, in order. `Err`: the session
    /// ended before the answer came (every command's outcome unknown).
    pub async fn send(
        &self,
        commands: Vec<api::SubmitRequest>,
    ) -> Result<Vec<api::SubmitResult>, Status> {
        let n = commands.len();
        let reply = self
            .pipe()
            .await?
            .send(api::SessionRequest { commands })
            .await?;
        if reply.results.len() != n {
            return Err(Status::internal(format!(
                "the node answered {} results for {n} commands",
                reply.results.len()
            )));
        }
        Ok(reply.results)
    }
}
