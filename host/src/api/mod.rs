//! The client API (`proto/api.proto`, package `waft.v1`): any node accepts any call.
//!
//! Writes, deploys, linearizable and lease reads and membership changes need the leader. A node
//! that is not the leader forwards the call to it over a reused channel, unchanged (a command
//! keeps its client id and sequence, so a retry after a leader change is still applied once).
//! A forwarded call carries the `waft-forwarded` header and is never forwarded again: if the
//! leadership moved in between, the client gets `UNAVAILABLE` and retries. It also carries the
//! caller's request id, so the call's tracing spans on both nodes share it (see [`trace`]).
//!
//! One concern per file: [`route`] (forward to the leader or handle here), `pb::upload` (deploy
//! and restore streams), [`data`] (`waft.v1.Waft`: commands, reads, the service list),
//! [`deploy`] (deploys, rollbacks, their checks), [`watch`], [`admin`] (`waft.v1.Cluster`:
//! membership, status, audits), [`backup`] (backups and restores), [`convert`] (mapping to
//! the API's messages), [`forward`] (follower-side batching of `Submit`s), [`session`] (pipelined commands on
//! one stream), [`trace`].

mod admin;
mod backup;
mod convert;
mod data;
mod deploy;
pub(crate) mod forward;
mod route;
mod session;
pub mod trace;
mod watch;

pub use backup::restore_chunks;
pub use route::forwarding_check;

use crate::Raft;
use crate::auth::Tokens;
use crate::raft::NetworkFactory;
use crate::runtime::Runtime;
use crate::storage::StateHandle;
use crate::types::NodeId;
use std::sync::Arc;
use tonic::Status;

/// Limits on client requests.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest command or query payload, in bytes.
    pub max_payload_bytes: usize,
    /// Largest backup `Restore` accepts (it travels as one log entry).
    pub max_backup_bytes: usize,
    /// Most `Watch` streams open at once on this node.
    pub max_watches: usize,
    /// The most guest memory this node's services may reserve, in bytes (see [`budget`]);
    /// `None`: no budget.
    pub max_guest_memory: Option<u64>,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_payload_bytes: 1 << 20,
            max_backup_bytes: 128 << 20,
            max_watches: 1024,
            max_guest_memory: None,
        }
    }
}

/// Both API services share this.
#[derive(Clone)]
pub struct Api {
    id: NodeId,
    addr: String,
    raft: Raft,
    state: StateHandle,
    runtime: Runtime,
    peers: NetworkFactory,
    limits: ApiLimits,
    snapshot_dir: std::path::PathBuf,
    tokens: Arc<Tokens>,
    forwarder: Arc<forward::Forwarder>,
    rpc: Arc<trace::RpcMetrics>,
    /// One deploy at a time per service on this node, from the look at what the service runs
    /// to the new version's apply: an identical deploy that arrives meanwhile (a retry) then
    /// finds it running and changes nothing.
    deploying: deploy::DeployLocks,
    /// Open `Watch` streams, at most `limits.max_watches`.
    watches: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// Requires tokens (see [`crate::auth`]).
    pub fn with_tokens(mut self, tokens: Tokens) -> Api {
        self.tokens = Arc::new(tokens);
        self
    }

    /// The API of the node with this Raft handle and state.
    pub fn new(
        id: NodeId,
        addr: String,
        raft: Raft,
        state: StateHandle,
        runtime: Runtime,
        peers: NetworkFactory,
        limits: ApiLimits,
    ) -> Api {
        let watches = Arc::new(tokio::sync::Semaphore::new(limits.max_watches));
        Api {
            id,
            addr,
            raft,
            state,
            runtime,
            peers,
            limits,
            snapshot_dir: std::path::PathBuf::new(),
            tokens: Arc::default(),
            forwarder: Arc::default(),
            deploying: Arc::default(),
            watches,
            rpc: Arc::default(),
        }
    }

    /// Where this node counts its calls (shared with the metrics endpoint).
    pub fn with_rpc_metrics(mut self, rpc: Arc<trace::RpcMetrics>) -> Api {
        self.rpc = rpc;
        self
    }

    /// Where this node's snapshots live (backups are read from there).
    pub fn with_snapshot_dir(mut self, dir: std::path::PathBuf) -> Api {
        self.snapshot_dir = dir;
        self
    }

    #[allow(clippy::result_large_err)]
    fn check_payload(&self, len: usize) -> Result<(), Status> {
        if len > self.limits.max_payload_bytes {
            return Err(Status::resource_exhausted(format!(
                "payload of {len} bytes is over the {}-byte limit",
                self.limits.max_payload_bytes
            )));
        }
        Ok(())
    }

    fn metrics(&self) -> openraft::RaftMetrics<crate::types::TypeConfig> {
        use openraft::async_runtime::WatchReceiver;
        self.raft.metrics().borrow_watched().clone()
    }
}
