//! [`StateHandle`]: read access to the live state, shared with the API, the audit and heal
//! RPCs and metrics.

use crate::runtime::GuestError;
use crate::storage::events::Events;
use crate::storage::modules::{ModulePeers, ModuleStore};
use crate::storage::snapshot::{self, VersionRecord};
use crate::types::{LogId, ServiceLimits};
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use super::{
    AuditStatus, DigestReply, HealReply, HealRequest, Healer, ServiceMetrics, SmState,
    SnapshotStats, heal, lock_or_stop,
};

/// A service as seen from outside the state machine.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    /// The active version number.
    pub version: u32,
    /// The versions kept for rollback, oldest first.
    pub history: Vec<VersionRecord>,
    /// Its name.
    pub name: String,
    /// What the runtime knows about its module (hash, size, imports, whether it was compiled
    /// or loaded from the on-disk cache).
    pub module: crate::runtime::ModuleInfo,
    /// Log index of the deploy that made this module active.
    pub deployed_at: u64,
    /// Pending timers, and when the earliest is due (ms since the Unix epoch). A service whose
    /// active version cannot take timers (a 0.1.0 guest) keeps them pending until one can.
    pub pending_timers: usize,
    /// When its earliest pending timer is due.
    pub next_timer_ms: Option<u64>,
}

/// What the state machine publishes each time it changes, for readers on async threads: they
/// read this, never the state machine's lock, which an apply holds for as long as a guest call
/// or a deploy takes (seconds, for a large component). A runtime worker blocked on that lock
/// stopped the node answering heartbeats: its peers' heartbeat streams, reset one by one while
/// they waited, made HTTP/2 close the connection (`too_many_resets`), replication stream
/// included, and a deploy under load cost elections (issue 18).
#[derive(Debug, Clone, Default)]
pub(super) struct View {
    pub(super) last_applied: Option<LogId>,
    pub(super) membership: crate::types::StoredMembership,
    pub(super) services: Vec<ServiceInfo>,
    pub(super) metrics: Vec<ServiceMetrics>,
    pub(super) audit: AuditStatus,
    pub(super) snapshots: SnapshotStats,
    /// The log's clock minus this node's wall clock, ms, when it last applied (see
    /// [`StateHandle::log_clock_offset_ms`]).
    pub(super) log_clock_offset_ms: i64,
    /// The active cluster version, and the versions this node runs.
    pub(super) cluster_version: u32,
    pub(super) runs: Option<crate::version::Runs>,
}

/// Read access to the live state, shared with the API (queries). Methods that are not
/// `async` read the published [`View`] and never wait for an apply; the `async` ones run on a
/// blocking thread.
#[derive(Clone)]
pub struct StateHandle {
    pub(super) state: Arc<Mutex<SmState>>,
    pub(super) view: Arc<Mutex<View>>,
    pub(super) runtime: crate::runtime::Runtime,
    pub(super) events: Arc<Events>,
    /// When the earliest timer a guest can take falls due here (see
    /// [`StateHandle::timer_deadline`]).
    pub(super) timer_deadline: Arc<tokio::sync::watch::Sender<Option<std::time::Instant>>>,
    /// How a diverged replica reaches its peers (set by the node once its network exists).
    pub(super) healer: Arc<Mutex<heal::HealerSlot>>,
    /// This node's modules (the state machine's own store).
    pub(super) modules: ModuleStore,
    /// How this node fetches a module it lacks (set by the node once its network exists).
    pub(super) module_peers: Arc<Mutex<Option<Arc<dyn ModulePeers>>>>,
    /// Modules whose compiled code this node fetched from a member (`--share-compiled`).
    pub(super) compiled_fetched: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateHandle").finish_non_exhaustive()
    }
}

/// What a query can fail with before the guest answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// No service by that name.
    #[error("no service named {0:?}")]
    NoSuchService(String),
    /// The guest's error (a rejection or a trap).
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// This replica's copy of the service diverged from the majority's and is not rebuilt
    /// yet: reading it here could return what no other replica holds.
    #[error("{0}")]
    Diverged(String),
}

/// The view's lock is held only to copy it in or out.
fn lock_view(view: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    crate::sync::lock_anyway(view)
}

impl SmState {
    /// Publishes what readers on async threads see (see [`View`]). Called whenever the state
    /// machine's lock is released after a change.
    pub(super) fn publish(&self) {
        let view = View {
            last_applied: self.rep.last_applied,
            membership: self.rep.membership.clone(),
            services: self
                .rep
                .services
                .iter()
                .map(|(n, s)| ServiceInfo {
                    version: s.history.last().map_or(0, |r| r.version),
                    history: s.history.clone(),
                    name: n.clone(),
                    module: s.module.info().clone(),
                    deployed_at: s.deployed_at,
                    pending_timers: s.timers.len(),
                    next_timer_ms: s.timers.next_due(),
                })
                .collect(),
            metrics: self
                .rep
                .services
                .iter()
                .map(|(name, svc)| ServiceMetrics {
                    name: name.clone(),
                    version: svc.history.last().map_or(0, |r| r.version),
                    fuel: svc.guest.fuel_total(),
                    recoveries: svc.guest.recoveries(),
                    host_faults: svc.guest.host_faults(),
                    memory_bytes: svc.guest.memory_bytes() as u64,
                    code_bytes: svc.guest.module().info().code_bytes as u64,
                    history_bytes: svc.guest.history_bytes() as u64,
                    pending_timers: svc.timers.len() as u64,
                    stats: self.local.seen.stats.get(name).cloned().unwrap_or_default(),
                })
                .collect(),
            audit: self.local.audit.status.clone(),
            snapshots: self.local.snapshots.clone(),
            log_clock_offset_ms: self.log_clock_offset_ms(),
            cluster_version: self.rep.cluster_version,
            runs: Some(self.runs),
        };
        // Told only when it changes: the timer proposer must not wake on every apply.
        let due = self.rep.next_timer_deadline();
        self.local.timer_deadline.send_if_modified(|v| {
            let changed = *v != due;
            *v = due;
            changed
        });
        *lock_view(&self.local.view) = view;
    }
}

impl SmState {
    /// See [`StateHandle::log_clock_offset_ms`] (0 before the first timestamped entry).
    fn log_clock_offset_ms(&self) -> i64 {
        match self.rep.last_timestamp_ms {
            0 => 0,
            log => log as i64 - crate::types::now_ms() as i64,
        }
    }
}

impl StateHandle {
    /// What this replica applied, for watchers.
    pub fn events(&self) -> Arc<Events> {
        self.events.clone()
    }

    /// Runs a read-only query against the service's guest, on a blocking thread.
    pub async fn query(&self, service: &str, request: Vec<u8>) -> Result<Vec<u8>, QueryError> {
        let state = self.state.clone();
        let service = service.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut st = lock_or_stop(&state);
            if let Some(why) = st.local.audit.status.unavailable.get(&service) {
                return Err(QueryError::Diverged(why.clone()));
            }
            let svc = st
                .rep
                .services
                .get_mut(&service)
                .ok_or(QueryError::NoSuchService(service))?;
            Ok(svc.guest.query(&request)?)
        })
        .await
        .unwrap_or_else(|e| {
            Err(QueryError::Guest(GuestError::Poisoned(format!(
                "query task failed: {e}"
            ))))
        })
    }

    /// The module bytes of a kept version of a service (`None`: no such service or version;
    /// `to == None` means the version before the active one).
    pub async fn version_module(
        &self,
        service: &str,
        to: Option<u32>,
    ) -> Option<(u32, Arc<Vec<u8>>, ServiceLimits)> {
        let target = self
            .services()
            .into_iter()
            .find(|s| s.name == service)
            .and_then(|s| super::rollback_target(&s.history, to).cloned())?;
        let store = self.modules.clone();
        tokio::task::spawn_blocking(move || {
            let hash = crate::runtime::ModuleHash::from_hex(&target.module)?;
            let bytes = store.read(&hash).ok()?;
            Some((target.version, Arc::new(bytes), target.limits))
        })
        .await
        .ok()
        .flatten()
    }

    /// The current state (guest snapshot) of one service, `None` when it does not exist.
    pub async fn service_state(&self, service: &str) -> Result<Option<Vec<u8>>, GuestError> {
        let state = self.state.clone();
        let service = service.to_owned();
        tokio::task::spawn_blocking(move || {
            match lock_or_stop(&state).rep.services.get_mut(&service) {
                Some(svc) => svc.guest.state().map(Some),
                None => Ok(None),
            }
        })
        .await
        .unwrap_or_else(|e| Err(GuestError::Poisoned(format!("snapshot task failed: {e}"))))
    }

    /// A service's module, limits and instance history, for a trial (see [`crate::trial`]).
    /// Blocking: call it on a blocking thread.
    pub fn running(&self, service: &str) -> Option<crate::trial::Running> {
        let st = lock_or_stop(&self.state);
        let svc = st.rep.services.get(service)?;
        Some(crate::trial::Running {
            module: svc.module.clone(),
            limits: svc
                .history
                .last()
                .map(|v| v.limits)
                .unwrap_or_default()
                .apply_to(st.runtime.limits().clone()),
            form: svc.guest.replay_form(),
        })
    }

    /// The largest module this node takes.
    pub fn max_module_bytes(&self) -> usize {
        self.runtime.limits().max_module_bytes
    }

    /// The memory limit of a service that sets none of its own, bytes.
    pub fn default_memory_limit(&self) -> u64 {
        self.runtime.limits().max_memory_bytes as u64
    }

    /// Keeps `module` (whose sha256 must be `sha256`) in the module store and compiles it into
    /// the runtime's cache, on a blocking thread, so that the deploy that follows finds it
    /// here and compiled. The state machine is not involved: nothing changes until the deploy
    /// entry is applied.
    pub async fn prepare_module(&self, module: Vec<u8>, sha256: String) -> Result<(), String> {
        let (runtime, store) = (self.runtime.clone(), self.modules.clone());
        tokio::task::spawn_blocking(move || {
            let hash = crate::runtime::ModuleHash::of(&module).to_hex();
            if hash != sha256 {
                return Err(format!(
                    "the module received has sha256 {hash}, not the {sha256} announced"
                ));
            }
            store
                .insert(&module)
                .map_err(|e| format!("cannot keep the module: {e}"))?;
            runtime.load(&module).map(|_| ()).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("the compile task failed: {e}"))?
    }

    /// Makes sure this node holds module `sha256`, fetching it from `sources` (node id,
    /// address) until `deadline` when it does not, then compiles it (see
    /// [`StateHandle::prepare_module`]). Returns the size of its compiled code.
    pub async fn hold_module(
        &self,
        sha256: &str,
        sources: &[(crate::types::NodeId, String)],
        deadline: tokio::time::Instant,
    ) -> Result<u64, String> {
        let hash = crate::runtime::ModuleHash::from_hex(sha256)
            .ok_or_else(|| format!("{sha256:?} is not a module hash"))?;
        if !self.modules.contains(&hash) {
            let peers = self
                .module_peers()
                .ok_or("this node cannot reach its peers yet")?;
            self.modules
                .fetch(peers.as_ref(), sources, &hash, Some(deadline))
                .await
                .map_err(|e| e.to_string())?;
        }
        if let (Some(peers), Some(path)) = (self.module_peers(), self.runtime.artifact_path(&hash))
            && !path.exists()
        {
            let key = self.runtime.artifact_key();
            match super::super::compiled::fetch(
                peers.as_ref(),
                sources,
                &hash,
                key,
                &path,
                deadline,
            )
            .await
            {
                Ok(node) => {
                    self.compiled_fetched
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(module = %hash, node, "fetched a module's compiled code")
                }
                Err(e) => tracing::debug!(module = %hash, error = %e, "compiling a module here"),
            }
        }
        let (runtime, store) = (self.runtime.clone(), self.modules.clone());
        tokio::task::spawn_blocking(move || {
            let module = store.read(&hash).map_err(|e| e.to_string())?;
            runtime
                .load(&module)
                .map(|m| m.info().code_bytes as u64)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("the compile task failed: {e}"))?
    }

    /// The key of the compiled code this node's runtime makes and loads.
    pub fn artifact_key(&self) -> &str {
        self.runtime.artifact_key()
    }

    /// This node's compiled code for module `sha256`, for an engine whose artifact key is
    /// `key`: the file, or why there is none.
    pub fn compiled_code(&self, sha256: &str, key: &str) -> Result<std::path::PathBuf, String> {
        let hash = crate::runtime::ModuleHash::from_hex(sha256)
            .ok_or_else(|| format!("{sha256:?} is not a module hash"))?;
        if key != self.runtime.artifact_key() {
            return Err(format!(
                "this node compiles for engine key {}, not {key}",
                self.runtime.artifact_key()
            ));
        }
        self.runtime
            .artifact_path(&hash)
            .filter(|p| p.exists())
            .ok_or_else(|| format!("this node has no compiled code for module {hash}"))
    }

    /// What this node's runtime compiled and loaded, and how many modules' compiled code it
    /// fetched from a member.
    pub fn compile_stats(&self) -> (crate::runtime::CompileStats, u64) {
        (
            self.runtime.compile_stats(),
            self.compiled_fetched
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The watch history this node holds: events, and bytes of their payloads and replies.
    pub fn watch_history(&self) -> (usize, usize) {
        self.events.held()
    }

    /// This node's module store.
    pub fn modules(&self) -> &ModuleStore {
        &self.modules
    }

    /// Lets this node fetch the modules it lacks through `peers` (the node's network).
    pub fn set_module_peers(&self, peers: Arc<dyn ModulePeers>) {
        *crate::sync::lock_anyway(&self.module_peers) = Some(peers);
    }

    pub(super) fn module_peers(&self) -> Option<Arc<dyn ModulePeers>> {
        crate::sync::lock_anyway(&self.module_peers).clone()
    }

    /// The engine fingerprint of this node's runtime.
    pub fn engine(&self) -> String {
        self.runtime.fingerprint().to_owned()
    }

    /// Per-service observations for metrics, in name order.
    pub fn service_metrics(&self) -> Vec<ServiceMetrics> {
        lock_view(&self.view).metrics.clone()
    }

    /// Checks that a backup loads (checksum, modules, every service accepts its state) without
    /// touching the live state. Returns the services it holds.
    pub async fn check_backup(&self, backup: Arc<Vec<u8>>) -> io::Result<Vec<String>> {
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || {
            let reader = snapshot::Reader::from_bytes(&backup)?;
            let (_, services, _) = super::persist::load_services(&runtime, reader)?;
            Ok(services.into_keys().collect())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// The log's clock (the last applied entry's timestamp: the leader's wall clock when it
    /// proposed it, never going back) minus this node's wall clock, in ms, as of its last
    /// apply. Near 0 (within a commit's latency) when clocks agree; far from it, wall clocks
    /// disagree, or a leader's ran ahead. Timers do not depend on it; guests' timestamps do.
    pub fn log_clock_offset_ms(&self) -> i64 {
        lock_view(&self.view).log_clock_offset_ms
    }

    /// This node's engine fingerprint (what a deploy entry must name for this node to apply
    /// it).
    pub fn fingerprint(&self) -> &str {
        self.runtime.fingerprint()
    }

    /// The active cluster version as of this replica's last apply (`crate::version`).
    pub fn cluster_version(&self) -> u32 {
        lock_view(&self.view).cluster_version
    }

    /// The cluster versions this node runs: its build's, unless a test made it play another
    /// (`--cluster-versions`).
    pub fn runs(&self) -> crate::version::Runs {
        lock_view(&self.view)
            .runs
            .unwrap_or(crate::version::Runs::THIS_BUILD)
    }

    /// Snapshots built and installed by this node.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        lock_view(&self.view).snapshots.clone()
    }

    /// What this replica learned from state audits (divergence checks).
    pub fn audit_status(&self) -> AuditStatus {
        lock_view(&self.view).audit.clone()
    }

    /// Lets a diverged replica heal through `healer` (the node's network); `None` stops it
    /// (the node is shutting down).
    pub fn set_healer(&self, healer: Option<Arc<dyn Healer>>) {
        *lock_or_stop(&self.healer) = match healer {
            Some(h) => heal::HealerSlot::Ready(h),
            None => heal::HealerSlot::Closed,
        };
    }

    /// This replica's digest at an audit index, for the leader collecting votes.
    pub fn digest_at(&self, index: u64) -> DigestReply {
        let st = lock_or_stop(&self.state);
        match st.digest_at(index) {
            Some(d) => DigestReply::Ready(d.clone()),
            None if st.rep.last_applied.is_none_or(|l| l.index() < index) => DigestReply::NotYet {
                applied: st.rep.last_applied.map_or(0, |l| l.index()),
            },
            None => DigestReply::Gone,
        }
    }

    /// Answers a diverged replica's request for the state it must rebuild.
    pub fn heal_source(&self, request: &HealRequest) -> HealReply {
        lock_or_stop(&self.state).answer_heal(request)
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId> {
        lock_view(&self.view).last_applied
    }

    /// The membership as of the last applied entry.
    pub fn membership(&self) -> crate::types::StoredMembership {
        lock_view(&self.view).membership.clone()
    }

    /// Every service's guest snapshot, by name: what replicas compare to prove they agree.
    pub async fn service_states(&self) -> io::Result<BTreeMap<String, Vec<u8>>> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let st = lock_or_stop(&state);
            let mut out = BTreeMap::new();
            for (name, svc) in &st.rep.services {
                let bytes = svc
                    .guest
                    .state()
                    .map_err(|e| io::Error::other(e.to_string()))?;
                out.insert(name.clone(), bytes);
            }
            Ok(out)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// The services, in name order.
    pub fn services(&self) -> Vec<ServiceInfo> {
        lock_view(&self.view).services.clone()
    }

    /// When the earliest pending timer that a guest can take falls due on this node's
    /// monotonic clock, told each time it changes: once it passes, the leader proposes a
    /// `FireDue` entry naming [`StateHandle::due_timers`].
    pub fn timer_deadline(&self) -> tokio::sync::watch::Receiver<Option<std::time::Instant>> {
        self.timer_deadline.subscribe()
    }

    /// The timers whose deadlines on this node passed by now, earliest first (at most
    /// `MAX_FIRES_PER_ENTRY`), read on a blocking thread.
    pub async fn due_timers(&self) -> Vec<crate::types::TimerRef> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            lock_or_stop(&state)
                .rep
                .due_timers(std::time::Instant::now())
        })
        .await
        .unwrap_or_default()
    }
}
