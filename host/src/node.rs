//! One waft node: storage, guest runtime, Raft and the gRPC server, started on a listener.
//!
//! [`Node::start`] takes an already bound listener, so tests bind `127.0.0.1:0` and learn the
//! port; [`run`] is the same with a shutdown future, for the binary.

use crate::Raft;
use crate::api::{Api, ApiLimits};
use crate::pb::api::{cluster_server::ClusterServer, waft_server::WaftServer};
use crate::pb::raft::raft_server::RaftServer;
use crate::raft::{Identity, NetConfig, NetworkFactory, RaftService, SnapshotLimits};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::storage::{LogStore, StateHandle, StateMachineStore};
use crate::types::NodeId;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
}

/// How a node stores its Raft log. A data directory keeps the engine it was created with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogEngine {
    /// A redb database (`log.redb`): one B-tree commit per batch of writes.
    Redb,
    /// An append-only file (`log.wal`, see [`crate::storage::wal`]): one write and one
    /// `fdatasync` per batch. The default for new data directories: about a quarter more
    /// writes per second than redb on the same machine (docs/benchmarks.md).
    #[default]
    Wal,
}

impl LogEngine {
    /// The log's file in `dir`.
    pub fn path(self, dir: &Path) -> PathBuf {
        match self {
            LogEngine::Redb => dir.join("log.redb"),
            LogEngine::Wal => dir.join("log.wal"),
        }
    }

    /// The engine of the log `dir` holds, if any; an error if it holds both.
    pub fn found_in(dir: &Path) -> std::io::Result<Option<LogEngine>> {
        let (redb, wal) = (LogEngine::Redb.path(dir), LogEngine::Wal.path(dir));
        match (redb.exists(), wal.exists()) {
            (true, true) => Err(std::io::Error::other(format!(
                "{} holds a log in both engines ({} and {}); move the one that is not this \
                 node's away",
                dir.display(),
                redb.display(),
                wal.display()
            ))),
            (true, false) => Ok(Some(LogEngine::Redb)),
            (false, true) => Ok(Some(LogEngine::Wal)),
            (false, false) => Ok(None),
        }
    }

    /// The engine to open `dir` with: the one asked for, which must be the one the directory
    /// holds if it holds a log; without a wish, the directory's, or the default for a new one.
    pub fn resolve(wanted: Option<LogEngine>, dir: &Path) -> std::io::Result<LogEngine> {
        match (wanted, LogEngine::found_in(dir)?) {
            (Some(w), Some(found)) if w != found => Err(std::io::Error::other(format!(
                "{} holds a log in the other engine ({}); start with the engine it was made \
                 with (--log-engine {}), or leave the option out",
                dir.display(),
                found.path(dir).display(),
                found.name()
            ))),
            (Some(w), _) => Ok(w),
            (None, Some(found)) => Ok(found),
            (None, None) => Ok(LogEngine::default()),
        }
    }

    /// The engine's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LogEngine::Redb => "redb",
            LogEngine::Wal => "wal",
        }
    }
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
        }
    }
}

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

/// A running node.
pub struct Node {
    id: NodeId,
    addr: String,
    raft: Raft,
    identity: Arc<Identity>,
    state: StateHandle,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    auditor: Option<JoinHandle<()>>,
    /// The network audits collect members' digests through.
    audit_net: NetworkFactory,
    remover: Option<JoinHandle<()>>,
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
        std::fs::create_dir_all(&config.data_dir)?;
        if config.runtime.cache_dir.is_none() {
            config.runtime.cache_dir = Some(config.data_dir.join("cache"));
        }
        let snapshot_dir = config.data_dir.join("snapshots");
        remove_partial_snapshots(&snapshot_dir);
        let runtime = Runtime::new(config.runtime.clone())?;
        let max_module = runtime.limits().max_module_bytes;
        let precompile = runtime.clone();
        let deploy_hook: crate::storage::DeployHook = Arc::new(move |module: &[u8]| {
            // Compile ahead of the commit, off every hot path; a failure here is reported when
            // the entry is applied, identically on every node.
            let runtime = precompile.clone();
            let module = module.to_vec();
            let _ = std::thread::Builder::new()
                .name("waft-precompile".into())
                .spawn(move || {
                    let _ = runtime.load(&module);
                });
        });
        let engine = LogEngine::resolve(config.log_engine, &config.data_dir)?;
        let sm =
            StateMachineStore::with_history(runtime.clone(), &snapshot_dir, config.watch_history)?;
        let state = sm.handle();
        let raft_config = openraft::Config {
            cluster_name: "waft".to_owned(),
            heartbeat_interval: config.raft.heartbeat.as_millis() as u64,
            election_timeout_min: config.raft.election_timeout.0.as_millis() as u64,
            election_timeout_max: config.raft.election_timeout.1.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.raft.snapshot_every),
            max_in_snapshot_log_to_keep: config.raft.keep_after_snapshot,
            install_snapshot_timeout: config.net.snapshot_deadline.as_millis() as u64,
            // A leader that restarts must win a new election, in a new term. With openraft's
            // default (restore leadership at once, same term), a leader killed before its own
            // log write of entry N flushed, but after followers stored N, comes back without N
            // and proposes a different entry N under the same log id; followers take it for
            // the one they have, and replicas diverge silently. Found by the chaos campaigns.
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        let raft_config = Arc::new(
            raft_config
                .validate()
                .map_err(|e| NodeError::Raft(e.to_string()))?,
        );
        let identity = Arc::new(
            Identity::load(config.id, &config.data_dir)?
                .with_cluster_token(config.tokens.cluster.clone()),
        );
        let network = NetworkFactory::new(config.net.clone(), identity.clone());
        // Before Raft starts: entries re-applied at start may heal (see `PeerHealer`).
        let healer = Arc::new(crate::raft::peer_audit::PeerHealer::new(
            config.id,
            network.clone(),
        ));
        state.set_healer(Some(healer.clone()));
        let log_path = engine.path(&config.data_dir);
        let raft = match engine {
            LogEngine::Redb => {
                let log = LogStore::open(&log_path)?.on_deploy(deploy_hook);
                Raft::new(config.id, raft_config, network.clone(), log, sm).await
            }
            LogEngine::Wal => {
                let log = crate::storage::WalLog::open(&log_path)?.on_deploy(deploy_hook);
                Raft::new(config.id, raft_config, network.clone(), log, sm).await
            }
        }
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        identity.watch(raft.metrics());
        let service = RaftService::new(
            raft.clone(),
            identity.clone(),
            snapshot_dir.clone(),
            config.snapshots.clone(),
        )
        .with_state(state.clone())
        .require_peer_certificate(config.net.tls.is_some());
        healer.attach(raft.clone());
        let max = config.net.max_message_bytes;
        // Shared by the client API and the etcd endpoint: one set of call counters.
        let trace = crate::api::trace::TraceLayer::new(config.id);
        let audit_net = network.clone();
        let api = Api::new(
            config.id,
            addr.clone(),
            raft.clone(),
            state.clone(),
            runtime,
            network,
            config.api.clone(),
        )
        .with_snapshot_dir(snapshot_dir.clone())
        .with_tokens(config.tokens.clone())
        .with_rpc_metrics(trace.metrics());
        // Client messages: a payload, or a deploy chunk, plus framing.
        let api_max = config.api.max_payload_bytes.max(max_module) + (64 << 10);
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<WaftServer<Api>>().await;
        health_reporter.set_serving::<ClusterServer<Api>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| NodeError::Raft(format!("reflection: {e}")))?;
        // Older clients (grpcurl up to 1.8) only speak the v1alpha reflection protocol.
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| NodeError::Raft(format!("reflection: {e}")))?;
        let etcd = match config.etcd_listen {
            None => None,
            Some(at) => {
                let l = TcpListener::bind(at).await?;
                let bound = l.local_addr()?;
                let kv = crate::etcd::EtcdKv::new(
                    api.clone(),
                    raft.clone(),
                    identity.clone(),
                    config.etcd_service.clone(),
                );
                let mut builder = server_builder(config.net.tls.as_ref())?.layer(trace.clone());
                let task = tokio::spawn(async move {
                    let served = builder
                        .add_service(
                            crate::pb::etcd::kv_server::KvServer::new(kv)
                                .max_decoding_message_size(api_max)
                                .max_encoding_message_size(api_max),
                        )
                        .serve_with_incoming(incoming(l))
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "the etcd endpoint stopped");
                    }
                });
                Some((bound, task))
            }
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            server_builder(config.net.tls.as_ref())?
                .layer(trace.clone())
                .add_service(
                    RaftServer::new(service)
                        .max_decoding_message_size(max)
                        .max_encoding_message_size(max),
                )
                .add_service(tonic::service::interceptor::InterceptedService::new(
                    WaftServer::new(api.clone())
                        .max_decoding_message_size(api_max)
                        .max_encoding_message_size(api_max),
                    crate::api::forwarding_check(identity.clone()),
                ))
                .add_service(tonic::service::interceptor::InterceptedService::new(
                    ClusterServer::new(api),
                    crate::api::forwarding_check(identity.clone()),
                ))
                .add_service(health)
                .add_service(reflection)
                .add_service(reflection_alpha)
                .serve_with_incoming_shutdown(incoming(listener), async {
                    let _ = stop_rx.await;
                }),
        );
        let metrics = match config.metrics_listen {
            None => None,
            Some(at) => {
                let l = TcpListener::bind(at).await?;
                let bound = l.local_addr()?;
                let task = tokio::spawn(crate::metrics::serve(
                    l,
                    raft.clone(),
                    state.clone(),
                    trace.metrics(),
                ));
                Some((bound, task))
            }
        };
        let auditor = config.raft.audit_interval.map(|every| {
            crate::audit::spawn_auditor(raft.clone(), audit_net.clone(), state.clone(), every)
        });
        let remover = config
            .raft
            .remove_unreachable
            .map(|policy| crate::autoremove::spawn(raft.clone(), policy));
        tracing::info!(node = config.id, %addr, data_dir = %config.data_dir.display(), "node started");
        Ok(Node {
            id: config.id,
            addr,
            raft,
            identity,
            state,
            stop_server: Some(stop_tx),
            server: Some(server),
            auditor,
            audit_net,
            remover,
            metrics,
            etcd,
        })
    }

    /// Seeds an empty data directory with a backup, offline: the directory becomes node
    /// `config.id` of a new one-node cluster (with its own cluster id) whose member address is
    /// `advertise`, and whose state is the backup's, in a snapshot. Start a node on that
    /// directory (`waft node --data-dir`) and add others with `--join`: they receive the state
    /// by snapshot. Returns the restore entry's index and the services restored.
    ///
    /// Refuses a directory that already holds a node's log, and a backup that does not verify
    /// or load (checksums, modules, every service accepting its state), before writing anything
    /// lasting.
    pub async fn seed_from_backup(
        mut config: NodeConfig,
        advertise: String,
        backup: Vec<u8>,
    ) -> Result<(u64, Vec<String>), NodeError> {
        use crate::types::{Request, Response};
        let dir = config.data_dir.clone();
        let log = config.log_engine.unwrap_or_default().path(&dir);
        if LogEngine::found_in(&dir)?.is_some() {
            return Err(NodeError::Restore(format!(
                "{} already holds a node's data; seed an empty directory, or restore into the \
                 running cluster with `waft restore FILE`",
                config.data_dir.display()
            )));
        }
        crate::storage::snapshot::Reader::from_bytes(&backup)
            .map_err(|e| NodeError::Restore(format!("not a usable backup: {e}")))?;
        config.advertise = Some(advertise.clone());
        config.raft.audit_interval = None;
        config.raft.remove_unreachable = None;
        config.metrics_listen = None;
        config.etcd_listen = None;
        // Nothing dials this node while it is seeded; it listens on a port of its own only
        // because a node always serves.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let node = Node::start(config, listener).await?;
        let seeded = async {
            let backup = Arc::new(backup);
            node.state()
                .check_backup(backup.clone())
                .await
                .map_err(|e| NodeError::Restore(format!("not a usable backup: {e}")))?;
            node.initialize(
                [(node.id(), openraft::BasicNode { addr: advertise })]
                    .into_iter()
                    .collect(),
            )
            .await?;
            node.raft()
                .wait(Some(Duration::from_secs(30)))
                .state(openraft::ServerState::Leader, "the seeded node leads")
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            let backup = Arc::try_unwrap(backup).unwrap_or_else(|shared| shared.to_vec());
            let written = node
                .raft()
                .client_write(Request::Restore {
                    backup,
                    force: false,
                    timestamp_ms: crate::types::now_ms(),
                })
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            let index = written.log_id.index;
            let services = match written.data {
                Response::Restored(services) => services,
                Response::DeployFailed(why) => return Err(NodeError::Restore(why)),
                other => {
                    return Err(NodeError::Restore(format!(
                        "unexpected response to a restore: {other:?}"
                    )));
                }
            };
            // In a snapshot, so nodes that join get the state in one transfer, not a replay.
            node.raft()
                .trigger()
                .snapshot()
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            node.raft()
                .wait(Some(Duration::from_secs(600)))
                .metrics(
                    |m| m.snapshot.is_some_and(|s| s.index >= index),
                    "the restored state is in a snapshot",
                )
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            Ok((index, services))
        }
        .await;
        let stopped = node.shutdown().await;
        if seeded.is_err() {
            // Leave no half-seeded node behind: a retry starts afresh.
            let _ = std::fs::remove_file(&log);
            let _ = std::fs::remove_file(dir.join("cluster-id"));
            let _ = std::fs::remove_dir_all(dir.join("snapshots"));
        }
        let seeded = seeded?;
        stopped?;
        Ok(seeded)
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
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(e) = &metrics.borrow_watched().running_state {
                return e.to_string();
            }
            if metrics.changed().await.is_err() {
                return "raft stopped".to_owned();
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
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        self.step_down(Duration::from_secs(3)).await;
        // A heal in progress gives up; the healer's Raft handle is released.
        self.state.set_healer(None);
        // Watches end, saying where to resume, before the server stops.
        self.state.events().close();
        if let Some(auditor) = self.auditor.take() {
            auditor.abort();
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
        tracing::info!(node = self.id, "node stopped");
        raft
    }
}

/// Accepted connections with Nagle's algorithm off. tonic's own `tcp_nodelay` applies only to
/// listeners it binds itself; without this, small replies wait for delayed ACKs (~20 ms per
/// round trip on Linux).
/// A gRPC server builder, serving TLS when `tls` is set.
fn server_builder(tls: Option<&crate::tls::Tls>) -> Result<tonic::transport::Server, NodeError> {
    let builder = tonic::transport::Server::builder().tcp_nodelay(true);
    match tls {
        None => Ok(builder),
        Some(tls) => {
            let config = tls.server().map_err(|e| NodeError::Tls(e.to_string()))?;
            builder.tls_config(config).map_err(|e| {
                NodeError::Tls(format!(
                    "the certificate, its key or the CA cannot be used together: {}",
                    source_chain(&e)
                ))
            })
        }
    }
}

/// An error and its sources, in words (tonic's transport error alone says little).
pub(crate) fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
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
