//! What a node is started with: its identity, directories, timing, limits and endpoints.

use crate::api::ApiLimits;
use crate::raft::{NetConfig, SnapshotLimits};
use crate::runtime::RuntimeConfig;
use crate::storage::LogEngine;
use crate::types::NodeId;
use std::path::PathBuf;
use std::time::Duration;

/// Raft timing and log-compaction settings.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout range: a follower that hears no leader for a random time in this range
    /// stands for election.
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log after a snapshot (lagging followers within this distance catch
    /// up from the log instead of a snapshot).
    pub keep_after_snapshot: u64,
    /// Most entries before the latest snapshot the leader keeps for members that lag behind it
    /// (one being sent a snapshot needs the entries after that snapshot; see [`crate::purge`]).
    pub keep_for_lagging: u64,
    /// How often the leader audits replica state (see [`crate::audit`]); `None` never does
    /// on its own (`waft cluster audit` still can).
    pub audit_interval: Option<Duration>,
    /// While this node leads, remove voters unreachable for longer than the policy says (see
    /// [`crate::autoremove`]); `None` (the default) never does.
    pub remove_unreachable: Option<crate::autoremove::RemovalPolicy>,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(500), Duration::from_millis(1000)),
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            keep_for_lagging: 200_000,
            audit_interval: Some(Duration::from_secs(30)),
            remove_unreachable: None,
        }
    }
}

/// Everything a node needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's Raft id, unique in the cluster.
    pub id: NodeId,
    /// Where the log, snapshots and compiled modules live.
    pub data_dir: PathBuf,
    /// The address peers and clients use to reach this node (default: the listener's address).
    pub advertise: Option<String>,
    /// Guest runtime settings. `cache_dir` defaults to `DATA_DIR/cache`.
    pub runtime: RuntimeConfig,
    /// Raft timing and compaction.
    pub raft: RaftSettings,
    /// Node-to-node network settings.
    pub net: NetConfig,
    /// Limits on incoming snapshots.
    pub snapshots: SnapshotLimits,
    /// Limits on client requests.
    pub api: ApiLimits,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Serve etcd's v3 KV API on this address (see [`crate::etcd`]).
    pub etcd_listen: Option<std::net::SocketAddr>,
    /// The service behind the etcd API (a deployed `etcd-kv` guest).
    pub etcd_service: String,
    /// Tokens callers and peers must present (see [`crate::auth`]); none by default.
    pub tokens: crate::auth::Tokens,
    /// How the Raft log is stored. `None`: the engine the data directory already holds, and
    /// [`LogEngine::default`] (the WAL) for a new directory.
    pub log_engine: Option<LogEngine>,
    /// How much of what it applied a node keeps for watchers starting from an earlier index.
    pub watch_history: crate::storage::events::HistoryLimits,
    /// Whether cheap batches are applied on the async worker that receives them rather than
    /// handed to a blocking thread (true; false only to measure what that saves).
    pub inline_apply: bool,
    /// A command payload at which this node's apply code panics (fault injection for the
    /// tests; None outside them).
    pub inject_apply_panic: Option<Vec<u8>>,
    /// Where this node records the node-to-node messages it receives and answers, for
    /// compatibility fixtures (`scripts/make-fixtures`; None outside it).
    pub record_messages: Option<PathBuf>,
    /// The cluster versions this node runs: this build's ([`Runs::THIS_BUILD`]) but in tests,
    /// which play a build of another range with it (`crate::version`).
    ///
    /// [`Runs::THIS_BUILD`]: crate::version::Runs::THIS_BUILD
    pub cluster_versions: crate::version::Runs,
    /// Whether the leader raises the cluster version by itself once every member runs a
    /// newer one (true), or waits for `waft cluster finalize-upgrade`.
    pub auto_finalize: bool,
}

impl NodeConfig {
    /// Defaults for node `id` with data in `data_dir`.
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            id,
            data_dir: data_dir.into(),
            advertise: None,
            runtime: RuntimeConfig::default(),
            raft: RaftSettings::default(),
            net: NetConfig::default(),
            snapshots: SnapshotLimits::default(),
            api: ApiLimits::default(),
            metrics_listen: None,
            etcd_listen: None,
            etcd_service: "etcd".to_owned(),
            tokens: crate::auth::Tokens::default(),
            log_engine: None,
            watch_history: Default::default(),
            inline_apply: true,
            inject_apply_panic: None,
            record_messages: None,
            cluster_versions: crate::version::Runs::THIS_BUILD,
            auto_finalize: true,
        }
    }
}
