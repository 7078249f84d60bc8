//! Opening a node's replicated core: the log (WAL or redb), the state machine, the Raft
//! identity and network, and openraft itself.

use super::{NodeConfig, NodeError};
use crate::Raft;
use crate::raft::{Identity, NetworkFactory};
use crate::runtime::Runtime;
use crate::storage::{LogEngine, RedbLog, StateHandle, StateMachineStore};
use std::sync::Arc;

/// A node's Raft and what it is built on.
pub(super) struct Core {
    pub(super) raft: Raft,
    pub(super) state: StateHandle,
    pub(super) identity: Arc<Identity>,
    /// The network to peers (Raft, audits, heals and forwarded calls share its connections).
    pub(super) network: NetworkFactory,
    /// What the log holds in memory (the WAL; redb keeps its entries on disk).
    pub(super) log_memory: Option<crate::storage::LogMemory>,
}

/// openraft's settings for `config`.
fn raft_config(config: &NodeConfig) -> Result<Arc<openraft::Config>, NodeError> {
    let raft_config = openraft::Config {
        cluster_name: "waft".to_owned(),
        heartbeat_interval: config.raft.heartbeat.as_millis() as u64,
        election_timeout_min: config.raft.election_timeout.0.as_millis() as u64,
        election_timeout_max: config.raft.election_timeout.1.as_millis() as u64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.raft.snapshot_every),
        // waft purges the log itself (`crate::purge`): openraft's policy drops the entries a
        // member being sent a snapshot needs after it.
        max_in_snapshot_log_to_keep: u64::MAX,
        install_snapshot_timeout: config.net.snapshot_deadline.as_millis() as u64,
        // A leader that restarts must win a new election, in a new term. With openraft's
        // default (restore leadership at once, same term), a leader killed before its own
        // log write of entry N flushed, but after followers stored N, comes back without N
        // and proposes a different entry N under the same log id; followers take it for
        // the one they have, and replicas diverge silently. Found by the chaos campaigns.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    raft_config
        .validate()
        .map(Arc::new)
        .map_err(|e| NodeError::Raft(e.to_string()))
}

/// Opens the log and the state machine in `config.data_dir` and starts Raft on them.
pub(super) async fn open(config: &NodeConfig, runtime: &Runtime) -> Result<Core, NodeError> {
    let snapshot_dir = config.data_dir.join("snapshots");
    let modules = crate::storage::ModuleStore::open(&config.data_dir.join("modules"))?;
    let (precompile, store) = (runtime.clone(), modules.clone());
    let deploy_hook: crate::storage::DeployHook = Arc::new(move |module| {
        // Compile ahead of the commit, off every hot path; a failure here is reported when
        // the entry is applied, identically on every node. A stored module this node does not
        // hold yet is fetched when the entry is applied.
        let (runtime, store) = (precompile.clone(), store.clone());
        let module = match module {
            crate::storage::DeployedModule::Inline(bytes) => Ok(bytes.to_vec()),
            crate::storage::DeployedModule::Stored(hash) => Err(hash.to_owned()),
        };
        let _ = std::thread::Builder::new()
            .name("waft-precompile".into())
            .spawn(move || {
                let bytes = match module {
                    Ok(bytes) => bytes,
                    Err(hash) => match crate::runtime::ModuleHash::from_hex(&hash)
                        .and_then(|h| store.read(&h).ok())
                    {
                        Some(bytes) => bytes,
                        None => return,
                    },
                };
                let _ = runtime.load_committed(&bytes);
            });
    });
    let engine = LogEngine::resolve(config.log_engine, &config.data_dir)?;
    let mut sm = StateMachineStore::with_history(
        runtime.clone(),
        &snapshot_dir,
        modules,
        config.watch_history,
    )?;
    if !config.inline_apply {
        sm = sm.without_inline_apply();
    }
    if let Some(payload) = &config.inject_apply_panic {
        sm = sm.inject_apply_panic(payload.clone());
    }
    sm = sm.with_cluster_versions(config.cluster_versions);
    let state = sm.handle();
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
    state.set_module_peers(Arc::new(crate::raft::PeerModules::new(
        config.id,
        network.clone(),
    )));
    let log_path = engine.path(&config.data_dir);
    let raft_config = raft_config(config)?;
    let (raft, log_memory) = match engine {
        LogEngine::Redb => {
            let mut log = RedbLog::open(&log_path)?.on_deploy(deploy_hook);
            let sm = sm.with_earlier_engines(earlier_engines(config, runtime, &mut log).await?);
            (
                Raft::new(config.id, raft_config, network.clone(), log, sm).await,
                None,
            )
        }
        LogEngine::Wal => {
            let mut log = crate::storage::WalLog::open(&log_path)?
                .on_deploy(deploy_hook)
                .of_node(config.id);
            let sm = sm.with_earlier_engines(earlier_engines(config, runtime, &mut log).await?);
            let memory = log.memory();
            (
                Raft::new(config.id, raft_config, network.clone(), log, sm).await,
                Some(memory),
            )
        }
    };
    let raft = raft.map_err(|e| NodeError::Raft(e.to_string()))?;
    identity.watch(raft.metrics());
    healer.attach(raft.clone());
    Ok(Core {
        raft,
        state,
        identity,
        network,
        log_memory,
    })
}

/// The engines that ran this data directory before (`DATA_DIR/engines`, one fingerprint a
/// line, this build's added durably now) and the log's last index as this build starts: the
/// deploys it may apply again though another engine validated them (see
/// [`crate::storage::state_machine::EarlierEngines`]).
async fn earlier_engines<L>(
    config: &NodeConfig,
    runtime: &Runtime,
    log: &mut L,
) -> Result<crate::storage::state_machine::EarlierEngines, NodeError>
where
    L: openraft::storage::RaftLogStorage<crate::types::TypeConfig>,
{
    let until = log
        .get_log_state()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?
        .last_log_id
        .map_or(0, |l| l.index);
    let path = config.data_dir.join("engines");
    let known = match std::fs::read_to_string(&path) {
        Ok(text) => text.lines().map(str::to_owned).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mine = runtime.fingerprint();
    let engines: Vec<String> = known.iter().filter(|e| *e != mine).cloned().collect();
    if !known.iter().any(|e| e == mine) {
        let mut all = known.clone();
        all.push(mine.to_owned());
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, all.join("\n") + "\n")?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&config.data_dir)?.sync_all()?;
        if !engines.is_empty() {
            tracing::warn!(
                engine = mine,
                earlier = ?engines,
                until,
                "this data directory ran another engine before: the deploys its log holds are \
                 applied again by this one"
            );
        }
    }
    Ok(crate::storage::state_machine::EarlierEngines { engines, until })
}
