//! [`Session`]: commands pipelined over one `Session` stream, answered in order, reopened
//! when it ends; and the retry loop that sends each command until it has an answer.

use crate::Error;
use crate::connect::Conn;
use crate::pipe::Pipe;
use crate::pool::{Pool, random_id, waft};
use crate::proto::{self, waft_client::WaftClient};
use crate::reply::Applied;
use std::sync::Arc;
use std::time::Duration;

/// A `Session` stream (`waft.v1.Waft/Session`): many requests in flight on one HTTP/2 stream,
/// each answered in the order sent, with a result per command. Cheap to clone; clones share
/// the stream. Opened on first use and again after it ends (on the node the client then
/// finds, for a session made by [`crate::Client::session`]).
///
/// A client id has one command in flight at a time, so each [`Session::submit`] in flight uses
/// a client session of its own (a lane): pipelining stays exactly-once.
#[derive(Debug, Clone)]
pub struct Session {
    source: Source,
    pipe: Arc<tokio::sync::Mutex<Option<Pipe>>>,
}

#[derive(Debug, Clone)]
enum Source {
    /// Follows the client's current node.
    Pool(Arc<Pool>),
    /// One connection, always.
    Conn(Box<WaftClient<Conn>>, u32),
}

impl Session {
    pub(crate) fn new(pool: Arc<Pool>) -> Session {
        Session {
            source: Source::Pool(pool),
            pipe: Arc::default(),
        }
    }

    /// A session on one given connection (a benchmark's per-node sessions): never moves to
    /// another node. `attempts` bounds [`Session::submit`]'s rounds.
    pub fn on(conn: WaftClient<Conn>, attempts: u32) -> Session {
        Session {
            source: Source::Conn(Box::new(conn), attempts.max(1)),
            pipe: Arc::default(),
        }
    }

    async fn pipe(&self) -> Result<Pipe, Error> {
        let mut slot = self.pipe.lock().await;
        if let Some(pipe) = slot.as_ref().filter(|p| !p.is_broken()) {
            return Ok(pipe.clone());
        }
        let mut conn = match &self.source {
            Source::Pool(c) => {
                if slot.is_some() {
                    // It broke: find the leader again.
                    c.reconnect().await;
                }
                waft(c.conn().await?)
            }
            Source::Conn(c, _) => (**c).clone(),
        };
        let pipe = Pipe::open(|requests| async move { conn.session(requests).await }).await?;
        *slot = Some(pipe.clone());
        Ok(pipe)
    }

    /// Sends `commands` as one request, as they are (their client ids and numbers are the
    /// caller's): one result per command, in order. `Err`: the stream ended before the answer
    /// came (every command's outcome unknown).
    pub async fn send(
        &self,
        commands: Vec<proto::SubmitRequest>,
    ) -> Result<Vec<proto::SubmitResult>, Error> {
        let n = commands.len();
        let reply = self
            .pipe()
            .await?
            .send(proto::SessionRequest { commands })
            .await?;
        check_count(reply.results, n)
    }

    /// Submits `payloads` to `service` as one request, numbered in a client session of their
    /// own; commands whose outcome is unknown (the stream ended, the leader changed) are sent
    /// again with their numbers until answered. One result per command, in order.
    pub async fn submit<P>(
        &self,
        service: &str,
        payloads: P,
    ) -> Result<Vec<Result<Applied, Error>>, Error>
    where
        P: IntoIterator,
        P::Item: Into<Vec<u8>>,
    {
        let (id, first) = match &self.source {
            Source::Pool(c) => c.take_lane(),
            Source::Conn(..) => (random_id(), 1),
        };
        let commands = numbered(service, payloads, id, first);
        let next = first + commands.len() as u64;
        let attempts = match &self.source {
            Source::Pool(c) => c.attempts(),
            Source::Conn(_, a) => *a,
        };
        let result = send_until_answered(self, commands, attempts).await;
        if let Source::Pool(c) = &self.source {
            c.put_lane((id, next));
        }
        result
    }
}

/// `payloads` as commands to `service` in client session `id`, numbered from `first`.
pub(crate) fn numbered<P>(
    service: &str,
    payloads: P,
    id: u64,
    first: u64,
) -> Vec<proto::SubmitRequest>
where
    P: IntoIterator,
    P::Item: Into<Vec<u8>>,
{
    payloads
        .into_iter()
        .zip(first..)
        .map(|(p, sequence)| proto::SubmitRequest {
            service: service.to_owned(),
            payload: p.into(),
            client_id: id,
            sequence,
        })
        .collect()
}

/// One round of sending commands: their results, in order, or why none came.
pub(crate) trait Round {
    async fn round(
        &self,
        commands: Vec<proto::SubmitRequest>,
    ) -> Result<Vec<proto::SubmitResult>, Error>;
}

impl Round for Session {
    async fn round(
        &self,
        commands: Vec<proto::SubmitRequest>,
    ) -> Result<Vec<proto::SubmitResult>, Error> {
        self.send(commands).await
    }
}

/// The results a node sent, if there is one per command.
pub(crate) fn check_count(
    results: Vec<proto::SubmitResult>,
    n: usize,
) -> Result<Vec<proto::SubmitResult>, Error> {
    if results.len() == n {
        Ok(results)
    } else {
        Err(Error::Server {
            code: tonic::Code::Internal,
            message: format!(
                "the node answered {} results for {n} commands",
                results.len()
            ),
        })
    }
}

/// Sends `commands` in rounds until each has an answer other than "unavailable" (or the
/// attempts run out): a command sent again keeps its client session and number, so it is
/// applied at most once.
pub(crate) async fn send_until_answered(
    via: &impl Round,
    commands: Vec<proto::SubmitRequest>,
    attempts: u32,
) -> Result<Vec<Result<Applied, Error>>, Error> {
    let n = commands.len();
    let mut answers: Vec<Option<Result<Applied, Error>>> = (0..n).map(|_| None).collect();
    let mut todo: Vec<usize> = (0..n).collect();
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=attempts.max(1) {
        let last = attempt == attempts.max(1);
        let sent: Vec<proto::SubmitRequest> = todo.iter().map(|&i| commands[i].clone()).collect();
        let results: Vec<Result<Applied, Error>> = match via.round(sent).await {
            Ok(results) => results.into_iter().map(from_result).collect(),
            // The round ended with these commands' outcome unknown: all of them again.
            Err(e) if e.is_retryable() && !last => todo.iter().map(|_| Err(e.clone())).collect(),
            Err(e) => return Err(e),
        };
        let mut again = Vec::new();
        for (i, result) in todo.into_iter().zip(results) {
            match result {
                Err(e) if e.is_retryable() && !last => again.push(i),
                other => answers[i] = Some(other),
            }
        }
        if again.is_empty() {
            break;
        }
        todo = again;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::Unavailable("no answer".to_owned()))))
        .collect())
}

/// One command's result in a batch or session reply.
pub fn from_result(result: proto::SubmitResult) -> Result<Applied, Error> {
    match result.result {
        Some(proto::submit_result::Result::Reply(r)) => Applied::from_reply(r),
        Some(proto::submit_result::Result::Failure(f)) => {
            Err(tonic::Status::new(tonic::Code::from(f.code), f.message).into())
        }
        None => Err(Error::Server {
            code: tonic::Code::Internal,
            message: "the node sent an empty result".to_owned(),
        }),
    }
}
