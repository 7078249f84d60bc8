//! The client API (`proto/api.proto`, package `waft.v1`): any node accepts any call.
//!
//! Writes, deploys, linearizable and lease reads and membership changes need the leader. A node
//! that is not the leader forwards the call to it over a reused channel, unchanged (a command
//! keeps its client id and sequence, so a retry after a leader change is still applied once).
//! A forwarded call carries the `waft-forwarded` header and is never forwarded again: if the
//! leadership moved in between, the client gets `UNAVAILABLE` and retries. It also carries the
//! caller's request id and deadline, so the call's tracing spans on both nodes share the id (see
//! [`trace`]).
//!
//! The shape: [`services`] is the gRPC surface: it checks each call's token for the role the
//! method needs ([`router::Router::authorize`] makes the [`Caller`]) and hands the message to
//! the handler of its concern, each holding only what it needs: [`Data`] (commands, reads, the
//! service list; [`session`]: pipelined commands on one stream), [`deploy::Deploys`] (deploys,
//! rollbacks, their checks), [`watch::Watches`], [`admin::Admin`] (membership, status,
//! audits), [`backup::Backups`]. Every handler that needs the leader asks the [`Router`], the
//! one way a call travels to another node (a follower's `Submit`s go in its batches:
//! `router::forward`). The etcd endpoint calls the same handlers in-process with typed
//! messages and a `Caller` of its own. `pb::upload` reads deploy and restore streams;
//! [`convert`] maps to the API's messages.

mod admin;
mod backup;
mod convert;
mod data;
mod deploy;
mod router;
mod services;
mod session;
mod steps;
pub mod trace;
mod watch;

pub use backup::restore_chunks;
pub use data::Data;
pub use router::{Caller, Router, forwarding_check};
pub use services::{ClusterService, WaftService};

use crate::Raft;
use crate::auth::Tokens;
use crate::raft::NetworkFactory;
use crate::runtime::Runtime;
use crate::storage::StateHandle;
use crate::types::NodeId;
use std::sync::Arc;

/// The most commands one `SubmitBatch` (or one group of a session) may carry.
pub(crate) const MAX_BATCH_COMMANDS: usize = 1024;

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

/// What a node's API is made of.
pub struct ApiParts {
    /// This node's id and the address its peers and clients reach it at.
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub state: StateHandle,
    pub runtime: Runtime,
    pub peers: NetworkFactory,
    pub limits: ApiLimits,
    /// Where this node's snapshots live (backups are read from there).
    pub snapshot_dir: std::path::PathBuf,
    /// The tokens calls need (see [`crate::auth`]).
    pub tokens: Tokens,
    /// Where this node counts its calls (shared with the metrics endpoint).
    pub rpc: Arc<trace::RpcMetrics>,
}

impl std::fmt::Debug for ApiParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiParts")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A node's API: its router and the handler of each concern.
#[derive(Clone, Debug)]
pub struct Api {
    router: Router,
    data: Data,
    deploys: deploy::Deploys,
    watches: watch::Watches,
    admin: admin::Admin,
    backups: backup::Backups,
}

impl Api {
    /// The API of a node made of `parts`.
    pub fn new(parts: ApiParts) -> Api {
        let router = Router::new(
            parts.id,
            parts.raft,
            parts.peers,
            Arc::new(parts.tokens),
            parts.rpc,
        );
        Api {
            data: Data::new(router.clone(), parts.state.clone(), parts.limits.clone()),
            deploys: deploy::Deploys::new(
                router.clone(),
                parts.state.clone(),
                parts.runtime.clone(),
                parts.limits.clone(),
            ),
            watches: watch::Watches::new(parts.state.clone(), &parts.limits),
            admin: admin::Admin::new(
                router.clone(),
                parts.addr,
                parts.state.clone(),
                parts.runtime,
                parts.limits.clone(),
            ),
            backups: backup::Backups::new(
                router.clone(),
                parts.state,
                parts.limits,
                parts.snapshot_dir,
            ),
            router,
        }
    }

    /// The `waft.v1.Waft` gRPC service.
    pub fn waft_service(&self) -> WaftService {
        WaftService::new(
            self.router.clone(),
            self.data.clone(),
            self.deploys.clone(),
            self.watches.clone(),
        )
    }

    /// The `waft.v1.Cluster` gRPC service.
    pub fn cluster_service(&self) -> ClusterService {
        ClusterService::new(
            self.router.clone(),
            self.admin.clone(),
            self.backups.clone(),
        )
    }

    /// Where this node's calls run (the etcd endpoint authorizes its callers here).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The data handler (the etcd endpoint's commands and reads go through it).
    pub fn data(&self) -> &Data {
        &self.data
    }
}
