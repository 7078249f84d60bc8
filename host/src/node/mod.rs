//! One waft node: storage, guest runtime, Raft and the gRPC server, started on a listener.
//!
//! [`Node::start`] takes an already bound listener, so tests bind `127.0.0.1:0` and learn the
//! port; [`run`] is the same with a shutdown future, for the binary. The steps live beside
//! this file: [`config`] (what a node is started with), `open` (log, state machine, Raft),
//! `server` (the gRPC servers), `seed` (a data directory seeded from a backup, offline).

mod accepted;
mod config;
pub mod join;
mod open;
mod seed;
mod server;

pub use crate::storage::LogEngine;
pub use config::{NodeConfig, RaftSettings};
pub(crate) use server::source_chain;

use crate::Raft;
use crate::raft::{Identity, NetworkFactory};
use crate::runtime::Runtime;
use crate::storage::StateHandle;
use crate::types::NodeId;
use open::Core;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How often [`Node::fatal`] looks at Raft's running state.
const FATAL_CHECK: Duration = Duration::from_millis(200);
use tokio::task::JoinHandle;

/// Why a node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Storage could not be opened (a corrupt or foreign file, permissions, a full disk).
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    /// The guest runtime could not be built.
    #[error("guest runtime: {0}")]
    Runtime(#[from] crate::runtime::LoadError),
    /// openraft refused the configuration or failed fatally.
    #[error("raft: {0}")]
    Raft(String),
    /// The TLS settings cannot be used (a key that does not match its certificate...).
    #[error("TLS: {0}")]
    Tls(String),
    /// A backup could not seed a data directory (see [`Node::seed_from_backup`]).
    #[error("restore: {0}")]
    Restore(String),
}

/// Says so when the services this node replayed reserve more guest memory than its budget
/// (a node restarted with a smaller `--max-guest-memory`): it keeps applying and serving them,
/// since refusing what the log committed would make this replica differ from the others.
fn warn_over_budget(config: &NodeConfig, state: &StateHandle) {
    let Some(budget) = config.api.max_guest_memory else {
        return;
    };
    let reserved = crate::budget::Reservations::of_node(state).total();
    if reserved > budget {
        tracing::warn!(
            reserved_mib = %crate::budget::mib(reserved),
            budget_mib = %crate::budget::mib(budget),
            "this node's services reserve more guest memory than --max-guest-memory allows; \
             they keep serving, and deploys that add to the reservation are refused"
        );
    }
}

/// A running node.
pub struct Node {
    id: NodeId,
    addr: String,
    raft: Raft,
    identity: Arc<Identity>,
    state: StateHandle,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The server's open connections, closed when the node stops (see [`accepted`]).
    accepted: accepted::Accepted,
    auditor: Option<JoinHandle<()>>,
    /// The network audits collect members' digests through.
    audit_net: NetworkFactory,
    remover: Option<JoinHandle<()>>,
    /// Purges the log (`crate::purge`).
    purger: JoinHandle<()>,
    /// Proposes the delivery of due guest timers while this node leads.
    timers: JoinHandle<()>,
    /// Raises the cluster version while this node leads (`crate::upgrade`; off with
    /// `--manual-finalize`).
    upgrader: Option<JoinHandle<()>>,
    metrics: Option<(std::net::SocketAddr, JoinHandle<()>)>,
    etcd: Option<(std::net::SocketAddr, JoinHandle<()>)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Gives the cluster an id (unless this node has one), then initializes Raft with `members`.
pub(crate) async fn initialize(
    raft: &Raft,
    identity: &Identity,
    members: std::collections::BTreeMap<NodeId, openraft::BasicNode>,
) -> Result<(), NodeError> {
    // Only a node with empty Raft state starts a cluster (openraft refuses the others below),
    // and only then does it get a new id.
    if !raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?
    {
        identity.create()?;
    }
    raft.initialize(members)
        .await
        .map_err(|e| NodeError::Raft(format!("cannot initialize the cluster: {e}")))
}

impl Node {
    /// Opens storage, builds the runtime, starts Raft and serves gRPC on `listener`.
    pub async fn start(mut config: NodeConfig, listener: TcpListener) -> Result<Node, NodeError> {
        let local = listener.local_addr()?;
        let addr = config
            .advertise
            .clone()
            .unwrap_or_else(|| local.to_string());
        if config.net.share_compiled && !config.net.tls.as_ref().is_some_and(|t| t.has_identity()) {
            return Err(NodeError::Tls(
                "--share-compiled makes this node run machine code its peers compiled, so the \
                 nodes must authenticate each other: start every node with mutual TLS \
                 (--tls-ca, --tls-cert, --tls-key), or without --share-compiled"
                    .to_owned(),
            ));
        }
        std::fs::create_dir_all(&config.data_dir)?;
        if config.runtime.cache_dir.is_none() {
            config.runtime.cache_dir = Some(config.data_dir.join("cache"));
        }
        remove_partial_snapshots(&config.data_dir.join("snapshots"));
        let runtime = Runtime::new(config.runtime.clone())?;
        let core = open::open(&config, &runtime).await?;
        warn_over_budget(&config, &core.state);
        let servers = server::serve(&config, &core, runtime, addr.clone(), listener).await?;
        let Core {
            raft,
            state,
            identity,
            network,
            log_memory,
        } = core;
        let metrics = match config.metrics_listen {
            None => None,
            Some(at) => {
                let l = TcpListener::bind(at).await?;
                let bound = l.local_addr()?;
                let task = tokio::spawn(crate::metrics::serve(
                    l,
                    crate::metrics::Sources {
                        raft: raft.clone(),
                        state: state.clone(),
                        rpc: servers.rpc.clone(),
                        rtt: network.rtt().clone(),
                        log: log_memory,
                        guest_memory_budget: config.api.max_guest_memory,
                    },
                ));
                Some((bound, task))
            }
        };
        let auditor = config.raft.audit_interval.map(|every| {
            crate::audit::spawn_auditor(raft.clone(), network.clone(), state.clone(), every)
        });
        let remover = config
            .raft
            .remove_unreachable
            .map(|policy| crate::autoremove::spawn(raft.clone(), policy));
        let purger = crate::purge::spawn(
            raft.clone(),
            crate::purge::PurgePolicy {
                keep: config.raft.keep_after_snapshot,
                max_lag: config.raft.keep_for_lagging,
            },
        );
        let timers = crate::timers::spawn(raft.clone(), state.clone());
        let upgrader = config
            .auto_finalize
            .then(|| crate::upgrade::spawn(raft.clone(), network.clone(), state.clone()));
        tracing::info!(node = config.id, %addr, data_dir = %config.data_dir.display(), "node started");
        Ok(Node {
            id: config.id,
            addr,
            raft,
            identity,
            state,
            stop_server: Some(servers.stop),
            server: Some(servers.main),
            accepted: servers.accepted,
            auditor,
            audit_net: network,
            remover,
            purger,
            timers,
            upgrader,
            metrics,
            etcd: servers.etcd,
        })
    }

    /// Initializes a new cluster with `members`, after giving it a cluster id (see
    /// [`Identity`]): the only way a cluster should be started.
    pub async fn initialize(
        &self,
        members: std::collections::BTreeMap<NodeId, openraft::BasicNode>,
    ) -> Result<(), NodeError> {
        initialize(&self.raft, &self.identity, members).await
    }

    /// The id of this node's cluster, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.identity.cluster()
    }

    /// Where the etcd endpoint listens, if it was asked for.
    pub fn etcd_addr(&self) -> Option<std::net::SocketAddr> {
        self.etcd.as_ref().map(|(a, _)| *a)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address peers and clients use.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where Prometheus metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|(a, _)| *a)
    }

    /// The Raft handle (writes, membership, metrics).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The node-to-node network (audits and heals reach peers through it).
    pub fn network(&self) -> &NetworkFactory {
        &self.audit_net
    }

    /// Runs one state audit (this node must lead): every member's digest is collected and
    /// judged, and replicas in the minority heal (see [`crate::audit`]).
    pub async fn audit(&self) -> Result<crate::audit::AuditOutcome, crate::audit::AuditError> {
        crate::audit::audit_now(&self.raft, &self.audit_net).await
    }

    /// A copy of the node's current Raft metrics (role, term, leader, log and apply progress).
    pub fn metrics(&self) -> openraft::RaftMetrics<crate::types::TypeConfig> {
        use openraft::async_runtime::WatchReceiver;
        self.raft.metrics().borrow_watched().clone()
    }

    /// The state machine (queries, inspection).
    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    /// Resolves when Raft stops on its own with a fatal error (a storage write failed, a deploy
    /// from a foreign engine): the node can no longer take part and should be stopped.
    pub async fn fatal(&self) -> String {
        use openraft::async_runtime::WatchReceiver;
        // Looked at a few times a second rather than on every change of the metrics: they
        // change at every commit, and waking for each would cost a thread switch per write.
        let metrics = self.raft.metrics();
        let mut every = tokio::time::interval(FATAL_CHECK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Err(e) = &metrics.borrow_watched().running_state {
                return e.to_string();
            }
        }
    }

    /// If this node leads, hands leadership to the voter whose log is most up to date and waits
    /// (up to `within`) for another node to take over, so clients see a leader change instead
    /// of an election timeout. Returns the new leader, if one took over.
    pub async fn step_down(&self, within: Duration) -> Option<NodeId> {
        let m = self.metrics();
        if !m.state.is_leader() {
            return None;
        }
        // Only a voter that acknowledged us recently can take over; a down one would just make
        // the hand-off time out.
        let alive = |id: &NodeId| {
            m.heartbeat
                .as_ref()
                .and_then(|h| h.get(id))
                .and_then(|t| t.as_ref())
                .is_some_and(|t| openraft::Instant::elapsed(&**t) < Duration::from_secs(1))
        };
        let voters: Vec<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.id && alive(v))
            .collect();
        let matched = |id: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id))
                .and_then(|l| l.as_ref().map(|l| l.index))
                .unwrap_or(0)
        };
        let to = voters.iter().copied().max_by_key(|v| (matched(v), *v))?;
        tracing::info!(
            node = self.id,
            to,
            "handing leadership over before stopping"
        );
        if self.raft.trigger().transfer_leader(to).await.is_err() {
            return None;
        }
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let m = self.metrics();
            if let Some(l) = m.current_leader
                && l != self.id
            {
                return Some(l);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Stops Raft, then the server, and waits for both. A leader hands leadership over first
    /// (see [`Node::step_down`]).
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.step_down(Duration::from_secs(3)).await;
        self.stop().await
    }

    /// Stops every node of `nodes` (the whole cluster, in one process: `waft dev`) at once:
    /// no leadership handover (nobody is left to lead), and every node's Raft stops before any
    /// server closes, so no node keeps replicating to a peer that is gone (which would log a
    /// warning per heartbeat). Heartbeats and elections stop first, then the leader, then the
    /// others, so no message is in flight to a Raft that is stopping. Returns each node's id
    /// and how its stop went, in order.
    pub async fn shutdown_together(nodes: Vec<Node>) -> Vec<(NodeId, Result<(), NodeError>)> {
        for n in &nodes {
            n.raft.runtime_config().heartbeat(false);
            n.raft.runtime_config().elect(false);
        }
        let (leaders, others): (Vec<&Node>, Vec<&Node>) =
            nodes.iter().partition(|n| n.metrics().state.is_leader());
        for group in [leaders, others] {
            let rafts = group.into_iter().map(|n| {
                let raft = n.raft.clone();
                async move { raft.shutdown().await }
            });
            futures::future::join_all(rafts).await;
        }
        let stops = nodes.into_iter().map(|n| {
            let id = n.id;
            async move { (id, n.stop().await) }
        });
        futures::future::join_all(stops).await
    }

    /// Stops the node's tasks, Raft (if it still runs) and server.
    async fn stop(mut self) -> Result<(), NodeError> {
        // A heal in progress gives up; the healer's Raft handle is released.
        self.state.set_healer(None);
        // Watches end, saying where to resume, before the server stops.
        self.state.events().close();
        if let Some(auditor) = self.auditor.take() {
            auditor.abort();
        }
        self.purger.abort();
        self.timers.abort();
        if let Some(upgrader) = self.upgrader.take() {
            upgrader.abort();
        }
        if let Some(remover) = self.remover.take() {
            remover.abort();
        }
        if let Some((_, task)) = self.metrics.take() {
            task.abort();
        }
        if let Some((_, task)) = self.etcd.take() {
            task.abort();
        }
        let raft = self
            .raft
            .shutdown()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()));
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take() {
            // Graceful shutdown waits for open streams to end, and a peer's long-lived append
            // stream never does: give in-flight calls a moment, then drop the connections.
            if tokio::time::timeout(Duration::from_secs(1), &mut server)
                .await
                .is_err()
            {
                server.abort();
                let _ = server.await;
            }
        }
        // The connections' tasks outlive the server's: end them, so that a peer reconnects to
        // whatever listens on this address next instead of talking to this stopped node.
        self.accepted.close_all();
        tracing::info!(node = self.id, "node stopped");
        raft
    }
}

/// Removes snapshot files left half-received by a crash.
fn remove_partial_snapshots(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("incoming-") || name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Runs a node until `shutdown` completes (mini-redis style: the caller owns the listener).
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let node = Node::start(config, listener).await?;
    shutdown.await;
    node.shutdown().await
}
