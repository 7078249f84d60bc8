//! The replicated state machine: committed entries in, guest calls out.
//!
//! The guests' state lives in their WebAssembly instances, in memory. Durability comes from the
//! log and from snapshots: on restart openraft installs the last snapshot and re-applies the
//! committed entries after it (the log store persists the committed log id for that). A batch
//! of entries is applied on the async worker when it is measured cheap, else on a blocking
//! thread (`store.rs`); a guest call behaves the same on either, because none ever waits or
//! enters the async runtime (`runtime/nonblocking.rs`). The state is behind a mutex that
//! queries share.

use crate::runtime::{Guest, GuestError, GuestModule, ModuleHash, Runtime};
use crate::storage::events::{Event, Events};
use crate::storage::modules::ModuleStore;
use crate::storage::snapshot::{Session, SnapshotFile, VersionRecord};
use crate::types::{Entry, LogId, Response, StoredMembership, TypeConfig};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

mod apply;
mod audit;
mod fault;
mod handle;
mod heal;
mod heal_task;
mod observe;
mod persist;
mod store;
mod timers;
mod versions;

pub use audit::{AuditStatus, DigestReply, Divergence, HealPlan, HealRecord};
pub use handle::{QueryError, ServiceInfo, StateHandle};
pub use heal::{HEAL_DEADLINE, HealReply, HealRequest, HealService, HealSource, Healer};
pub use observe::{APPLY_BUCKETS_US, ServiceMetrics, ServiceStats, SnapshotStats};
pub use store::{SnapshotBuilder, StateMachineStore};
pub use timers::{MAX_FIRES_PER_ENTRY, MAX_PENDING_TIMERS, Timer, Timers};

/// Responses to the entries applied, and the heal to run before the rest (returned) are.
type Applied = (Vec<Response>, Option<(HealPlan, Vec<Entry>)>);

/// A snapshot as openraft sees it.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>;

/// At most this many exactly-once sessions are kept; past it the session applied longest ago is
/// dropped (by log index, so every replica drops the same one).
const MAX_SESSIONS: usize = 100_000;

/// One named service: a guest and where it came from.
struct Service {
    module: Arc<GuestModule>,
    guest: Guest,
    deployed_at: u64,
    /// Versions kept for rollback, oldest first; the last one is active.
    history: Vec<VersionRecord>,
    /// Pending timers (replicated; they outlive versions: a hot-swap keeps them).
    timers: Timers,
}

/// Versions kept per service (their modules stay in every node's module store and in
/// snapshots).
const MAX_VERSIONS: usize = 10;

/// The state machine behind the lock: the replicated state, what this replica observed, and
/// the runtime both use.
struct SmState {
    runtime: Runtime,
    /// The cluster versions this node's build runs (`crate::version`).
    runs: crate::version::Runs,
    /// The engines earlier builds ran this data directory with, trusted for the deploys its
    /// log held when this build started (see [`EarlierEngines`]).
    earlier: EarlierEngines,
    /// This node's modules, by hash: every kept version's module is here.
    modules: ModuleStore,
    /// What the log builds.
    rep: Replicated,
    /// What this replica saw doing it.
    local: Local,
}

/// The state the log builds: identical on every replica at the same applied index, and what
/// snapshots carry (audits digest it).
struct Replicated {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    last_timestamp_ms: u64,
    services: BTreeMap<String, Service>,
    sessions: BTreeMap<u64, Session>,
    /// The active cluster version (`crate::version`): what formats nodes may write.
    cluster_version: u32,
}

/// What applying entries may use besides the replicated state it builds: the engine and the
/// module store (alike on every replica at the same index), and the sink where this replica
/// records what it saw. The methods that build replicated state (`impl Replicated` in
/// apply.rs, versions.rs, timers.rs and persist.rs) take one and reach nothing else of the
/// node: not the audits, the heal sources, the watchers' history or the published view.
struct Env<'a> {
    runtime: &'a Runtime,
    runs: crate::version::Runs,
    earlier: &'a EarlierEngines,
    modules: &'a ModuleStore,
    seen: &'a mut Seen,
}

/// The engines this node's data directory ran with before this build (an upgrade that
/// changed the engine fingerprint), and the last log index when this build started. A deploy
/// entry up to that index that one of them validated was applied by this node before, and by
/// its peers of that engine: this node applies it again when it replays its log, rather than
/// stopping as it does for a foreign engine's deploy (operators no longer snapshot every node
/// by hand before the restart). Running one guest on two engines is what audits check.
#[derive(Debug, Clone, Default)]
pub struct EarlierEngines {
    /// Fingerprints.
    pub engines: Vec<String>,
    /// The log's last index when this build started.
    pub until: u64,
}

impl EarlierEngines {
    fn trusts(&self, engine: &str, index: u64) -> bool {
        index <= self.until && self.engines.iter().any(|e| e == engine)
    }
}

/// What applying entries records on this replica alone: counters for metrics, the events for
/// watchers, the entry being applied (for a fault's report). Written by the apply, never read
/// by it: nothing here changes what an entry does.
#[derive(Default)]
struct Seen {
    /// Per-service counters for metrics.
    stats: BTreeMap<String, ServiceStats>,
    /// Events of the entries being applied, recorded when the batch is done.
    pending_events: Vec<Event>,
    /// The entry being applied and, once its batch reaches a guest, its service: what a
    /// fault that stops the node names (see `fault.rs`).
    applying: (u64, Option<Arc<str>>),
}

/// What this replica observed while applying: never replicated, never in snapshots, and never
/// read by a guest.
struct Local {
    /// What the apply records (the only part of `Local` it reaches).
    seen: Seen,
    /// This replica's own digests and audit results.
    audit: audit::Audit,
    /// What dissenting replicas need to heal, kept at recent audits.
    heal_sources: heal::HealSources,
    /// Snapshots built and installed here, for metrics.
    snapshots: SnapshotStats,
    /// What was applied, for watchers.
    events: Arc<Events>,
    /// Where [`SmState::publish`] puts what readers on async threads see.
    view: Arc<Mutex<handle::View>>,
    /// When the earliest timer a guest can take falls due on this node's monotonic clock,
    /// published when it changes.
    timer_deadline: Arc<tokio::sync::watch::Sender<Option<std::time::Instant>>>,
    /// The command payload at which waft's own apply code panics, as a bug there would: set
    /// only by the hidden node flag `--inject-apply-panic`, for `tests/all/chaos/apply_fault.rs`.
    inject_panic_at: Option<Vec<u8>>,
}

use crate::sync::lock_or_stop;

/// Why an entry did not produce a reply, in words (for watchers).
fn failure(response: &Response) -> String {
    match response {
        Response::Trapped(m) | Response::DeployFailed(m) | Response::Rejected(m) => m.clone(),
        Response::NoSuchService(s) => format!("no service named {s:?}"),
        other => format!("{other:?}"),
    }
}

fn guest_response(result: Result<Vec<u8>, GuestError>) -> Response {
    match result {
        Ok(reply) => Response::Reply(reply),
        Err(GuestError::Rejected(msg)) => Response::Rejected(msg),
        Err(GuestError::Refused(msg)) => {
            Response::Rejected(format!("waft refused what the command did: {msg}"))
        }
        Err(e) => Response::Trapped(e.to_string()),
    }
}

impl SmState {
    fn new(
        runtime: Runtime,
        modules: ModuleStore,
        events: Arc<Events>,
        view: Arc<Mutex<handle::View>>,
        timer_deadline: Arc<tokio::sync::watch::Sender<Option<std::time::Instant>>>,
    ) -> SmState {
        SmState {
            runtime,
            runs: crate::version::Runs::THIS_BUILD,
            earlier: EarlierEngines::default(),
            modules,
            rep: Replicated {
                last_applied: None,
                membership: StoredMembership::default(),
                last_timestamp_ms: 0,
                services: BTreeMap::new(),
                sessions: BTreeMap::new(),
                cluster_version: crate::version::FIRST,
            },
            local: Local {
                seen: Seen::default(),
                audit: audit::Audit::default(),
                heal_sources: heal::HealSources::default(),
                snapshots: SnapshotStats::default(),
                events,
                view,
                timer_deadline,
                inject_panic_at: None,
            },
        }
    }
}

impl SmState {
    /// The replicated state and what building it may use, apart, so that both can be
    /// borrowed at once.
    fn split(&mut self) -> (&mut Replicated, Env<'_>) {
        (
            &mut self.rep,
            Env {
                runtime: &self.runtime,
                runs: self.runs,
                earlier: &self.earlier,
                modules: &self.modules,
                seen: &mut self.local.seen,
            },
        )
    }
}

impl Service {
    /// The version a rollback to `to` makes serve again (see [`rollback_target`]).
    fn rollback_target(&self, to: Option<u32>) -> Option<&VersionRecord> {
        rollback_target(&self.history, to)
    }
}

/// The version a rollback to `to` makes serve again: version `to`, or without one the version
/// before the active one (the last in `history`). The one rule for the apply and the API's
/// check before it proposes.
fn rollback_target(history: &[VersionRecord], to: Option<u32>) -> Option<&VersionRecord> {
    match to {
        Some(v) => history.iter().find(|r| r.version == v),
        None => history.iter().rev().nth(1),
    }
}

impl Replicated {
    /// The modules of every kept version.
    fn used_modules(&self) -> std::collections::BTreeSet<ModuleHash> {
        self.services
            .values()
            .flat_map(|s| s.history.iter())
            .filter_map(|r| ModuleHash::from_hex(&r.module))
            .collect()
    }
}

impl SmState {}

impl Replicated {
    /// The module bytes of a kept version, from the module store. Missing means this node lost
    /// a file it must have (the apply fetches every kept version's module first): an error,
    /// never a different outcome from the other replicas.
    fn module_of(&self, env: &mut Env<'_>, version: &VersionRecord) -> std::io::Result<Vec<u8>> {
        let hash = ModuleHash::from_hex(&version.module).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("version {} names no module hash", version.version),
            )
        })?;
        env.modules.read(&hash)
    }
}
