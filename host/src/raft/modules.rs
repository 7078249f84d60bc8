//! Modules between nodes, client side: fetching a module from a peer's module store
//! ([`PeerModules`], what the state machine uses for a module it lacks), and asking a member to
//! hold a module before a deploy names it ([`hold_module`]). The server side is
//! `RaftService::fetch_module` and `RaftService::hold_module`; the store is
//! [`crate::storage::modules`].
//!
//! A deploy used to carry the module inside its log entry: up to 64 MiB through every append
//! stream, WAL, snapshot and backup, once per version. Now the entry names the module by hash,
//! and the bytes move once per node, on a stream of their own that the receiver paces.

use super::network::NetworkFactory;
use crate::pb::{self, raft::raft_client::RaftClient};
use crate::storage::ModulePeers;
use crate::storage::modules::ModuleBytes;
use crate::types::NodeId;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::time::Duration;

/// How a node fetches modules from its peers (the `FetchModule` RPC).
#[derive(Clone, Debug)]
pub struct PeerModules {
    me: NodeId,
    net: NetworkFactory,
}

impl PeerModules {
    /// Fetches for node `me` through `net`.
    pub fn new(me: NodeId, net: NetworkFactory) -> PeerModules {
        PeerModules { me, net }
    }
}

impl ModulePeers for PeerModules {
    fn me(&self) -> NodeId {
        self.me
    }

    fn open(
        &self,
        node: NodeId,
        addr: String,
        sha256: String,
        offset: u64,
    ) -> BoxFuture<'static, Result<ModuleBytes, String>> {
        let fetch = self.fetch(node, addr, sha256, offset, String::new());
        async move { Ok(fetch.await?.1) }.boxed()
    }

    fn open_compiled(
        &self,
        node: NodeId,
        addr: String,
        sha256: String,
        key: String,
    ) -> BoxFuture<'static, Result<(u64, ModuleBytes), String>> {
        if !self.net.config().share_compiled {
            return async { Err("this node does not share compiled code".to_owned()) }.boxed();
        }
        let fetch = self.fetch(node, addr, sha256, 0, key);
        async move {
            let (headers, chunks) = fetch.await?;
            let size = headers
                .get(super::service::ARTIFACT_SIZE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("the peer did not say how big its compiled code is")?;
            Ok((size, chunks))
        }
        .boxed()
    }
}

impl PeerModules {
    /// `FetchModule` for `sha256` from `offset` on, or for its compiled code for engine key
    /// `compiled_for`: the stream of data chunks, and the response's headers.
    fn fetch(
        &self,
        node: NodeId,
        addr: String,
        sha256: String,
        offset: u64,
        compiled_for: String,
    ) -> BoxFuture<'static, Result<(tonic::metadata::MetadataMap, ModuleBytes), String>> {
        let net = self.net.clone();
        let timeout = net.config().module_chunk_timeout;
        async move {
            // Its own connection: a module's megabytes never queue in front of Raft's messages.
            let mut client = RaftClient::new(net.bulk_channel(&addr)?);
            let mut req = tonic::Request::new(pb::raft::FetchModuleRequest {
                sha256,
                offset,
                compiled_for,
            });
            net.identity().stamp(req.metadata_mut(), node);
            let (headers, stream, _) = tokio::time::timeout(timeout, client.fetch_module(req))
                .await
                .map_err(|_| "no answer".to_owned())?
                .map_err(|s| format!("{}: {}", s.code(), s.message()))?
                .into_parts();
            let chunks = futures::stream::unfold(stream, move |mut stream| async move {
                let next = match tokio::time::timeout(timeout, stream.next()).await {
                    Err(_) => Some(Err("the transfer stalled".to_owned())),
                    Ok(None) => None,
                    Ok(Some(Err(s))) => Some(Err(format!("{}: {}", s.code(), s.message()))),
                    Ok(Some(Ok(chunk))) => match chunk.kind {
                        Some(pb::raft::module_chunk::Kind::Data(bytes)) => Some(Ok(bytes)),
                        _ => Some(Err("a module stream carries data chunks only".to_owned())),
                    },
                };
                next.map(|item| (item, stream))
            });
            Ok((headers, chunks.boxed()))
        }
        .boxed()
    }
}

/// Why a member does not hold a module.
#[derive(Debug)]
pub enum HoldError {
    /// The member runs a release without module stores: deploys to it must carry the bytes.
    Unsupported,
    /// It could not fetch or compile it (the reason, naming the node).
    Failed(String),
    /// Running it for the service would take the member over its guest memory budget (the
    /// member's words, naming the node).
    OverBudget(String),
}

/// The service a module is held for, and its memory limit once the module serves it: the
/// member checks them against its guest memory budget.
#[derive(Debug, Clone)]
pub struct Reserve {
    pub service: String,
    pub memory_limit: u64,
}

/// Asks node `node` at `addr` to hold module `sha256` (`size` bytes), fetching it from
/// `sources` unless it has it, and to compile it; waits at most `timeout`. With `reserve`, the
/// member also checks its guest memory budget. Returns how long that took there, in
/// milliseconds.
#[allow(clippy::too_many_arguments)]
pub async fn hold_module(
    net: &NetworkFactory,
    node: NodeId,
    addr: &str,
    sha256: &str,
    size: u64,
    sources: &[(NodeId, String)],
    reserve: Option<&Reserve>,
    timeout: Duration,
) -> Result<u64, HoldError> {
    let failed = |e: String| HoldError::Failed(format!("node {node} at {addr}: {e}"));
    let message = pb::raft::HoldModuleRequest {
        sha256: sha256.to_owned(),
        size,
        sources: sources
            .iter()
            .map(|(node, addr)| pb::raft::ModuleSource {
                node: *node,
                addr: addr.clone(),
            })
            .collect(),
        timeout_ms: timeout.as_millis() as u64,
        reserve: reserve.map(|r| pb::raft::ServiceReservation {
            service: r.service.clone(),
            memory_limit: r.memory_limit,
        }),
    };
    let call = |message: pb::raft::HoldModuleRequest| async move {
        let mut client = RaftClient::new(net.channel(addr).map_err(failed)?);
        let mut req = tonic::Request::new(message);
        net.identity().stamp(req.metadata_mut(), node);
        // A little longer than the member's own deadline, so that its answer says why.
        req.set_timeout(timeout + Duration::from_secs(5));
        Ok::<_, HoldError>(client.hold_module(req).await)
    };
    // Holding is idempotent. A pooled connection to a member that restarted fails its first
    // call before the member sees it (CANCELLED): send it once more (a failed connection
    // reconnects).
    let mut answer = call(message.clone()).await?;
    if matches!(&answer, Err(s) if s.code() == tonic::Code::Cancelled) {
        answer = call(message).await?;
    }
    let reply = match answer {
        Ok(reply) => reply,
        Err(s) if s.code() == tonic::Code::Unimplemented => return Err(HoldError::Unsupported),
        Err(s) if s.code() == tonic::Code::ResourceExhausted => {
            return Err(HoldError::OverBudget(format!(
                "node {node} at {addr}: {}",
                s.message()
            )));
        }
        Err(s) => return Err(failed(format!("{}: {}", s.code(), s.message()))),
    };
    let held: Result<u64, String> =
        pb::decode(reply.get_ref()).map_err(|s| failed(s.message().to_owned()))?;
    held.map_err(|e| failed(format!("cannot run the module: {e}")))
}
