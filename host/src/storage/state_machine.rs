//! The replicated state machine: committed entries in, guest calls out.
//!
//! The guests' state lives in their WebAssembly instances, in memory. Durability comes from the
//! log and from snapshots: on restart openraft installs the last snapshot and re-applies the
//! committed entries after it (the log store persists the committed log id for that). Guest
//! calls are CPU work and never run on the async runtime: each batch of entries is applied on a
//! blocking thread, with the state behind a mutex that queries share.

use crate::runtime::{ApplyCtx, Guest, GuestError, GuestModule, ModuleHash, Runtime};
use crate::storage::events::{Event, Events, HistoryLimits, Outcome};
use crate::storage::snapshot::{
    self, ServiceRecord, Session, SnapshotFile, SnapshotHeader, VersionRecord,
};
use crate::types::{
    ClientSeq, Entry, LogId, Request, Response, ServiceLimits, SnapshotMeta, StoredMembership,
    TypeConfig,
};
use futures::StreamExt;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::vote::RaftLeaderId;
use openraft::{EntryPayload, OptionalSend};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod audit;
mod heal;
pub use audit::{AuditStatus, DigestReply, Divergence, HealRecord};
pub use heal::{HEAL_DEADLINE, HealPlan, HealReply, HealRequest, HealService, HealSource, Healer};

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
}

/// Versions kept per service (their modules stay on every node and in snapshots).
const MAX_VERSIONS: usize = 10;

/// The state the log builds. Identical on every replica at the same applied index.
struct SmState {
    runtime: Runtime,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    last_timestamp_ms: u64,
    services: BTreeMap<String, Service>,
    /// Module bytes by hash, kept for snapshots (a new node needs them).
    modules: BTreeMap<ModuleHash, Arc<Vec<u8>>>,
    sessions: BTreeMap<u64, Session>,
    /// This replica's own digests and audit results: local observations, never replicated
    /// and never in snapshots.
    audit: audit::Audit,
    /// What dissenting replicas need to heal, kept at recent audits: local, never replicated.
    heal_sources: heal::HealSources,
    /// Per-service counters for metrics: local observations, never replicated.
    stats: BTreeMap<String, ServiceStats>,
    /// Snapshots built and installed here, for metrics.
    snapshots: SnapshotStats,
    /// What was applied, for watchers: local observations, never replicated.
    events: Arc<Events>,
    /// Events of the entries being applied, recorded when the batch is done.
    pending_events: Vec<Event>,
}

/// Snapshots this node built and installed (local observations, for metrics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotStats {
    /// Snapshots built.
    pub built: u64,
    /// Size of the last one built, bytes.
    pub last_built_bytes: u64,
    /// Time the last build took (capture and file), seconds.
    pub last_build_seconds: f64,
    /// Snapshots installed (received from a leader, or loaded at start).
    pub installed: u64,
    /// Size of the last one installed, bytes.
    pub last_installed_bytes: u64,
    /// Time the last install took (loading every service's state), seconds.
    pub last_install_seconds: f64,
}

/// Upper bounds (µs) of the apply-latency histogram buckets.
pub const APPLY_BUCKETS_US: [u64; 10] = [5, 10, 25, 50, 100, 250, 500, 1000, 5000, 25000];

/// One service as the metrics endpoint shows it.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    /// Service name.
    pub name: String,
    /// Active version.
    pub version: u32,
    /// Fuel its guest consumed, all calls and replays included.
    pub fuel: u64,
    /// Times its guest was rebuilt after a trap.
    pub recoveries: u64,
    /// Counters and apply latency.
    pub stats: ServiceStats,
}

/// What this node saw a service's guest do (for metrics; not replicated state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Commands applied with a reply.
    pub applied: u64,
    /// Commands the guest rejected.
    pub rejected: u64,
    /// Commands that trapped (and were rolled back).
    pub trapped: u64,
    /// Apply latency per command: counts per bucket of [`APPLY_BUCKETS_US`], then overflow.
    pub latency_buckets: [u64; 11],
    /// Sum of apply latencies, µs.
    pub latency_sum_us: u64,
}

use crate::sync::lock_or_stop as lock;

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
        Err(e) => Response::Trapped(e.to_string()),
    }
}

impl SmState {
    fn new(runtime: Runtime, events: Arc<Events>) -> SmState {
        SmState {
            events,
            pending_events: Vec::new(),
            runtime,
            last_applied: None,
            membership: StoredMembership::default(),
            last_timestamp_ms: 0,
            services: BTreeMap::new(),
            modules: BTreeMap::new(),
            sessions: BTreeMap::new(),
            audit: audit::Audit::default(),
            heal_sources: heal::HealSources::default(),
            stats: BTreeMap::new(),
            snapshots: SnapshotStats::default(),
        }
    }

    /// Applies committed entries in order and returns one response per entry.
    ///
    /// Fails only when a deploy was validated by an engine with another fingerprint: applying it
    /// could make this replica diverge, so the node must stop instead (openraft treats the
    /// error as fatal).
    ///
    /// Stops after an audit's votes entry that leaves this replica in the minority: the
    /// entries after it are returned with the heal to run first (see [`heal`]).
    fn apply_entries(&mut self, entries: Vec<Entry>) -> io::Result<Applied> {
        let Some(first) = entries.first() else {
            return Ok((Vec::new(), None));
        };
        let first = first.log_id().index();
        let (out, heal) = self.apply_all(entries)?;
        let last = self.last_applied.map_or(first, |l| l.index());
        let events = std::mem::take(&mut self.pending_events);
        self.events.record(first..=last, events);
        Ok((out, heal))
    }

    fn apply_all(&mut self, entries: Vec<Entry>) -> io::Result<Applied> {
        let mut out = Vec::with_capacity(entries.len());
        // Consecutive commands for one service are applied as a batch (same outcome, fewer
        // calls into the guest); anything else flushes the batch first.
        let mut batch: Vec<(ApplyCtx, Vec<u8>, Option<ClientSeq>)> = Vec::new();
        let mut batch_service = String::new();
        let mut entries = entries.into_iter();
        while let Some(entry) = entries.next() {
            let log_id = entry.log_id();
            let term = log_id.committed_leader_id().term();
            // A forced deploy applies as a deploy; its findings go with the new version.
            let (payload, forced) = match entry.payload {
                EntryPayload::Normal(Request::ForcedDeploy {
                    service,
                    module,
                    engine,
                    limits,
                    timestamp_ms,
                    findings,
                }) => (
                    EntryPayload::Normal(Request::Deploy {
                        service,
                        module,
                        engine,
                        limits,
                        timestamp_ms,
                    }),
                    Some(findings),
                ),
                other => (other, None),
            };
            match payload {
                EntryPayload::Normal(Request::Command {
                    service,
                    payload,
                    client,
                    timestamp_ms,
                }) => {
                    let ctx = ApplyCtx {
                        index: log_id.index(),
                        term,
                        timestamp_ms: self.advance_clock(timestamp_ms),
                    };
                    let repeat = client.is_some_and(|c| {
                        batch
                            .iter()
                            .any(|(_, _, b)| b.is_some_and(|b| b.client_id == c.client_id))
                    });
                    if service != batch_service || repeat {
                        self.flush(&batch_service, &mut batch, &mut out);
                        batch_service = service;
                    }
                    if let Some(c) = client
                        && let Some(s) = self.sessions.get(&c.client_id).filter(|s| c.seq <= s.seq)
                    {
                        // A retry of a command already applied: same answer, no effect.
                        let response = if c.seq == s.seq {
                            s.response.clone()
                        } else {
                            Response::Rejected(format!(
                                "sequence {} of client {:x} is older than its last applied command ({}); \
                                     its reply is no longer kept",
                                c.seq, c.client_id, s.seq
                            ))
                        };
                        self.flush(&batch_service, &mut batch, &mut out);
                        out.push(response);
                        self.last_applied = Some(log_id);
                        continue;
                    }
                    batch.push((ctx, payload, client));
                }
                EntryPayload::Normal(Request::Deploy {
                    service,
                    module,
                    engine,
                    limits,
                    timestamp_ms,
                }) => {
                    self.flush(&batch_service, &mut batch, &mut out);
                    if engine != self.runtime.fingerprint() {
                        let msg = format!(
                            "refusing to apply the deploy of service {service:?} at index {}: it was validated by \
                             engine {engine}, this node runs {}; running it here could diverge from the other \
                             replicas. Run the same waft build (and limits) on every node.",
                            log_id.index(),
                            self.runtime.fingerprint()
                        );
                        tracing::error!("{msg}");
                        return Err(io::Error::other(msg));
                    }
                    let at = self.advance_clock(timestamp_ms);
                    let ctx = ApplyCtx {
                        index: log_id.index(),
                        term,
                        timestamp_ms: at,
                    };
                    let response = self.deploy(&service, module, limits, ctx, forced);
                    self.version_event(log_id.index(), &service, at, &response);
                    out.push(response);
                }
                EntryPayload::Normal(Request::Rollback {
                    service,
                    to,
                    timestamp_ms,
                }) => {
                    self.flush(&batch_service, &mut batch, &mut out);
                    let at = self.advance_clock(timestamp_ms);
                    let ctx = ApplyCtx {
                        index: log_id.index(),
                        term,
                        timestamp_ms: at,
                    };
                    let response = self.rollback(&service, to, ctx);
                    self.version_event(log_id.index(), &service, at, &response);
                    out.push(response);
                }
                EntryPayload::Normal(Request::Restore {
                    backup,
                    force,
                    timestamp_ms,
                }) => {
                    self.flush(&batch_service, &mut batch, &mut out);
                    self.advance_clock(timestamp_ms);
                    let response = self.restore_backup(backup, force);
                    if matches!(response, Response::Restored(_)) {
                        // Every service's state was replaced: watchers read it afresh.
                        self.pending_events.clear();
                        self.events.reset(log_id.index());
                    }
                    out.push(response);
                }
                EntryPayload::Normal(Request::Audit { timestamp_ms }) => {
                    self.flush(&batch_service, &mut batch, &mut out);
                    self.advance_clock(timestamp_ms);
                    out.push(Response::Audited(self.record_digest(log_id.index())?));
                }
                EntryPayload::Normal(Request::AuditReport { digest }) => {
                    self.flush(&batch_service, &mut batch, &mut out);
                    self.check_report(&digest);
                    out.push(Response::Empty);
                }
                EntryPayload::Normal(Request::AuditVotes {
                    index,
                    proposer,
                    votes,
                }) => {
                    self.flush(&batch_service, &mut batch, &mut out);
                    out.push(Response::Empty);
                    self.last_applied = Some(log_id);
                    if let Some(plan) = self.check_votes(log_id.index(), index, proposer, &votes) {
                        return Ok((out, Some((plan, entries.collect()))));
                    }
                }
                EntryPayload::Normal(Request::ForcedDeploy { .. }) => {
                    unreachable!("a forced deploy is applied as a deploy (see above)")
                }
                EntryPayload::Membership(m) => {
                    self.flush(&batch_service, &mut batch, &mut out);
                    self.membership = StoredMembership::new(Some(log_id), m);
                    out.push(Response::Empty);
                }
                EntryPayload::Blank => {
                    self.flush(&batch_service, &mut batch, &mut out);
                    out.push(Response::Empty);
                }
            }
            self.last_applied = Some(log_id);
        }
        self.flush(&batch_service, &mut batch, &mut out);
        Ok((out, None))
    }

    /// Time never goes backwards: a new leader with a slower clock gets the previous time.
    fn advance_clock(&mut self, proposed_ms: u64) -> u64 {
        self.last_timestamp_ms = self.last_timestamp_ms.max(proposed_ms);
        self.last_timestamp_ms
    }

    fn flush(
        &mut self,
        service: &str,
        batch: &mut Vec<(ApplyCtx, Vec<u8>, Option<ClientSeq>)>,
        out: &mut Vec<Response>,
    ) {
        if batch.is_empty() {
            return;
        }
        let entries = std::mem::take(batch);
        let responses: Vec<Response> = match self.services.get_mut(service) {
            None => entries
                .iter()
                .map(|_| Response::NoSuchService(service.to_owned()))
                .collect(),
            Some(svc) => {
                let calls: Vec<(ApplyCtx, &[u8])> =
                    entries.iter().map(|(c, p, _)| (*c, p.as_slice())).collect();
                let started = std::time::Instant::now();
                let responses: Vec<Response> = svc
                    .guest
                    .apply_batch(&calls)
                    .into_iter()
                    .map(guest_response)
                    .collect();
                // Observation only: the clock never reaches the guest or the replicated state.
                let per_entry_us =
                    (started.elapsed().as_micros() as u64) / (responses.len().max(1) as u64);
                // The service's name is copied only the first time (this is the apply hot path).
                if !self.stats.contains_key(service) {
                    self.stats
                        .insert(service.to_owned(), ServiceStats::default());
                }
                let stats = self.stats.get_mut(service).expect("inserted above");
                let bucket = APPLY_BUCKETS_US
                    .iter()
                    .position(|b| per_entry_us <= *b)
                    .unwrap_or(APPLY_BUCKETS_US.len());
                for r in &responses {
                    match r {
                        Response::Rejected(_) => stats.rejected += 1,
                        Response::Trapped(_) => stats.trapped += 1,
                        _ => stats.applied += 1,
                    }
                    stats.latency_buckets[bucket] += 1;
                    stats.latency_sum_us += per_entry_us;
                }
                responses
            }
        };
        let name: Arc<str> = Arc::from(service);
        for ((ctx, payload, client), response) in entries.into_iter().zip(responses) {
            if let Some(c) = client {
                self.remember(c, ctx.index, &response);
            }
            self.pending_events.push(Event {
                index: ctx.index,
                service: name.clone(),
                timestamp_ms: ctx.timestamp_ms,
                payload,
                outcome: match &response {
                    Response::Reply(r) => Outcome::Reply(r.clone()),
                    Response::Rejected(m) => Outcome::Rejected(m.clone()),
                    other => Outcome::Failed(failure(other)),
                },
            });
            out.push(response);
        }
    }

    /// Records the outcome of a deploy or rollback for watchers.
    fn version_event(&mut self, index: u64, service: &str, timestamp_ms: u64, response: &Response) {
        let outcome = match response {
            Response::Deployed { version, .. } => Outcome::Version(*version),
            other => Outcome::Failed(failure(other)),
        };
        self.pending_events.push(Event {
            index,
            service: Arc::from(service),
            timestamp_ms,
            payload: Vec::new(),
            outcome,
        });
    }

    fn remember(&mut self, c: ClientSeq, index: u64, response: &Response) {
        self.sessions.insert(
            c.client_id,
            Session {
                seq: c.seq,
                response: response.clone(),
                index,
            },
        );
        if self.sessions.len() > MAX_SESSIONS
            && let Some((&oldest, _)) = self.sessions.iter().min_by_key(|(id, s)| (s.index, **id))
        {
            self.sessions.remove(&oldest);
        }
    }

    /// Installs `module` as `service`, carrying the old module's state over through
    /// snapshot → restore. Any failure leaves the old module serving, on every replica alike.
    fn deploy(
        &mut self,
        service: &str,
        module: Vec<u8>,
        limits: ServiceLimits,
        ctx: ApplyCtx,
        forced: Option<String>,
    ) -> Response {
        let hash = ModuleHash::of(&module);
        let bytes = self
            .modules
            .get(&hash)
            .cloned()
            .unwrap_or_else(|| Arc::new(module));
        self.activate(service, bytes, limits, ctx, forced)
    }

    /// Makes an earlier version serve again (as a new version, so history only grows).
    fn rollback(&mut self, service: &str, to: Option<u32>, ctx: ApplyCtx) -> Response {
        let Some(svc) = self.services.get(service) else {
            return Response::NoSuchService(service.to_owned());
        };
        let target = match to {
            Some(v) => svc.history.iter().find(|r| r.version == v),
            None => svc.history.iter().rev().nth(1),
        };
        let Some(target) = target else {
            let kept: Vec<String> = svc.history.iter().map(|r| r.version.to_string()).collect();
            return Response::DeployFailed(match to {
                Some(v) => format!(
                    "service {service:?} has no version {v} (kept: {})",
                    kept.join(", ")
                ),
                None => format!("service {service:?} has no earlier version to roll back to"),
            });
        };
        let Some(bytes) =
            ModuleHash::from_hex(&target.module).and_then(|h| self.modules.get(&h).cloned())
        else {
            return Response::DeployFailed(format!(
                "the module of version {} is no longer kept",
                target.version
            ));
        };
        let (limits, forced) = (target.limits, target.forced.clone());
        self.activate(service, bytes, limits, ctx, forced)
    }

    /// Installs `module` as the next version of `service`, carrying the old module's state over
    /// through snapshot → restore. Any failure leaves the old version serving, on every replica
    /// alike. The new instance is opened at the deploy entry (its start-up code and `restore`
    /// see that entry's clock and randomness).
    fn activate(
        &mut self,
        service: &str,
        module: Arc<Vec<u8>>,
        limits: ServiceLimits,
        ctx: ApplyCtx,
        forced: Option<String>,
    ) -> Response {
        let index = ctx.index;
        let loaded = match self.runtime.load(&module) {
            Ok(m) => m,
            Err(e) => return Response::DeployFailed(e.to_string()),
        };
        let limits_now = limits.apply_to(self.runtime.limits().clone());
        let mut history = Vec::new();
        let mut state = None;
        if let Some(old) = self.services.get_mut(service) {
            // A replicated call on the old instance (every replica makes it here).
            match old.guest.snapshot() {
                Ok(s) => state = Some(Arc::from(s)),
                Err(e) => {
                    return Response::DeployFailed(format!(
                        "the running version could not snapshot its state: {e}"
                    ));
                }
            };
            history = old.history.clone();
        }
        let had_state = state.is_some();
        let guest = match self.runtime.open(&loaded, service, limits_now, ctx, state) {
            Ok(g) => g,
            Err(crate::runtime::OpenError::Guest(e)) if had_state => {
                return Response::DeployFailed(format!(
                    "the new version refused the current state: {e}"
                ));
            }
            Err(e) => return Response::DeployFailed(e.to_string()),
        };
        let hash = loaded.hash();
        let version = history.last().map_or(1, |r| r.version + 1);
        history.push(VersionRecord {
            version,
            module: hash.to_hex(),
            deployed_at: index,
            limits,
            forced,
        });
        if history.len() > MAX_VERSIONS {
            history.drain(..history.len() - MAX_VERSIONS);
        }
        self.modules.insert(hash, module);
        self.services.insert(
            service.to_owned(),
            Service {
                module: loaded,
                guest,
                deployed_at: index,
                history,
            },
        );
        self.prune_modules();
        Response::Deployed {
            module: hash.to_hex(),
            version,
        }
    }

    /// Drops module bytes no kept version uses.
    fn prune_modules(&mut self) {
        let used: std::collections::BTreeSet<String> = self
            .services
            .values()
            .flat_map(|s| s.history.iter().map(|r| r.module.clone()))
            .collect();
        self.modules.retain(|h, _| used.contains(&h.to_hex()));
    }

    /// Takes everything a snapshot needs; the guests' states are copied now, so later entries
    /// do not leak into this snapshot.
    fn capture(&self) -> io::Result<Captured> {
        let mut services = Vec::new();
        let mut states = Vec::new();
        for (name, svc) in &self.services {
            // The guest's history, not a call on the live instance: taking a snapshot is a
            // local event (each node picks its own moment), so it must change nothing there.
            // Replaying the history rebuilds the instance byte for byte, which a fresh instance
            // restored from the guest's own snapshot would not (state hidden in a language
            // runtime), and it works for a guest whose `snapshot` traps.
            let state = crate::storage::log_store::encode(&svc.guest.replay_form())?;
            let replay = true;
            services.push(ServiceRecord {
                name: name.clone(),
                module: svc.module.hash().to_hex(),
                deployed_at: svc.deployed_at,
                state_len: state.len() as u64,
                replay,
                version: svc.history.last().map_or(0, |r| r.version),
                history: svc.history.clone(),
            });
            states.push(state);
        }
        let modules: Vec<(String, Arc<Vec<u8>>)> = self
            .modules
            .iter()
            .map(|(h, b)| (h.to_hex(), b.clone()))
            .collect();
        let last = self.last_applied;
        Ok(Captured {
            header: SnapshotHeader {
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: self.membership.clone(),
                },
                last_timestamp_ms: self.last_timestamp_ms,
                engine: self.runtime.fingerprint().to_owned(),
                sessions: self.sessions.iter().map(|(k, v)| (*k, v.clone())).collect(),
                modules: modules
                    .iter()
                    .map(|(h, b)| (h.clone(), b.len() as u64))
                    .collect(),
                services,
            },
            modules: modules.into_iter().map(|(_, b)| b).collect(),
            states,
        })
    }

    /// Replaces the whole state with the one in a (verified) snapshot file.
    fn install(&mut self, file: std::fs::File) -> io::Result<()> {
        let started = std::time::Instant::now();
        let bytes = file.metadata().map_or(0, |m| m.len());
        self.install_file(file)?;
        let s = &mut self.snapshots;
        s.installed += 1;
        s.last_installed_bytes = bytes;
        s.last_install_seconds = started.elapsed().as_secs_f64();
        Ok(())
    }

    fn install_file(&mut self, file: std::fs::File) -> io::Result<()> {
        let reader = snapshot::Reader::open(file)?;
        let (header, services, modules) = load_services(&self.runtime, reader)?;
        self.last_applied = header.meta.last_log_id;
        self.membership = header.meta.last_membership.clone();
        self.last_timestamp_ms = header.last_timestamp_ms;
        self.services = services;
        self.modules = modules;
        self.sessions = header.sessions.into_iter().collect();
        // The state jumped to the snapshot's: what came before it cannot be told.
        self.events
            .reset(header.meta.last_log_id.map_or(0, |l| l.index()));
        Ok(())
    }

    /// Applies a `Restore` entry: the services, modules and sessions of a backup replace the
    /// current ones; the log position and membership stay this cluster's. Refused (nothing
    /// changes) if services exist already and `force` is off, or the backup does not load.
    fn restore_backup(&mut self, backup: Vec<u8>, force: bool) -> Response {
        if !force && !self.services.is_empty() {
            return Response::DeployFailed(format!(
                "restore refused: this cluster already runs {} service(s); restore into an empty \
                 cluster, or force it to replace them",
                self.services.len()
            ));
        }
        let loaded = snapshot::Reader::from_bytes(&backup)
            .and_then(|reader| load_services(&self.runtime, reader));
        match loaded {
            Ok((header, services, modules)) => {
                let names: Vec<String> = services.keys().cloned().collect();
                self.advance_clock(header.last_timestamp_ms);
                self.services = services;
                self.modules = modules;
                self.sessions = header.sessions.into_iter().collect();
                Response::Restored(names)
            }
            Err(e) => Response::DeployFailed(format!("restore failed: {e}")),
        }
    }
}

type Loaded = (
    SnapshotHeader,
    BTreeMap<String, Service>,
    BTreeMap<ModuleHash, Arc<Vec<u8>>>,
);

/// Loads every module and service of a (verified) snapshot into fresh guests.
fn load_services(runtime: &Runtime, mut reader: snapshot::Reader<'_>) -> io::Result<Loaded> {
    let header = reader.header.clone();
    if header.engine != runtime.fingerprint() {
        tracing::warn!(
            theirs = %header.engine,
            ours = %runtime.fingerprint(),
            "loading a snapshot written by a node with a different engine fingerprint"
        );
    }
    let mut modules = BTreeMap::new();
    let mut loaded = BTreeMap::new();
    for (hash, len) in &header.modules {
        let bytes = reader.section(*len)?;
        let module = runtime
            .load(&bytes)
            .map_err(|e| io::Error::other(format!("snapshot module {hash} does not load: {e}")))?;
        if &module.hash().to_hex() != hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot module {hash} has another hash"),
            ));
        }
        loaded.insert(hash.clone(), module.clone());
        modules.insert(module.hash(), Arc::new(bytes));
    }
    let mut services = BTreeMap::new();
    for record in &header.services {
        let state = reader.section(record.state_len)?;
        let module = loaded.get(&record.module).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot service {} names a missing module", record.name),
            )
        })?;
        let limits = record
            .history
            .last()
            .map(|v| v.limits)
            .unwrap_or_default()
            .apply_to(runtime.limits().clone());
        let form = snapshot::service_form(reader.format, record, state)?;
        let guest = runtime
            .from_replay(module, &record.name, limits, &form)
            .map_err(|e| {
                io::Error::other(format!(
                    "service {} refused its snapshot state: {e}",
                    record.name
                ))
            })?;
        services.insert(
            record.name.clone(),
            Service {
                module: module.clone(),
                guest,
                deployed_at: record.deployed_at,
                history: record.history.clone(),
            },
        );
    }
    Ok((header, services, modules))
}

struct Captured {
    header: SnapshotHeader,
    modules: Vec<Arc<Vec<u8>>>,
    states: Vec<Vec<u8>>,
}

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
}

/// Read access to the live state, shared with the API (queries).
#[derive(Clone)]
pub struct StateHandle {
    state: Arc<Mutex<SmState>>,
    events: Arc<Events>,
    /// How a diverged replica reaches its peers (set by the node once its network exists).
    healer: Arc<Mutex<heal::HealerSlot>>,
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
            let mut st = lock(&state);
            if let Some(why) = st.audit.status.unavailable.get(&service) {
                return Err(QueryError::Diverged(why.clone()));
            }
            let svc = st
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
    pub fn version_module(
        &self,
        service: &str,
        to: Option<u32>,
    ) -> Option<(u32, Arc<Vec<u8>>, ServiceLimits)> {
        let st = lock(&self.state);
        let svc = st.services.get(service)?;
        let target = match to {
            Some(v) => svc.history.iter().find(|r| r.version == v),
            None => svc.history.iter().rev().nth(1),
        }?;
        let hash = ModuleHash::from_hex(&target.module)?;
        st.modules
            .get(&hash)
            .map(|b| (target.version, b.clone(), target.limits))
    }

    /// The current state (guest snapshot) of one service, `None` when it does not exist.
    pub async fn service_state(&self, service: &str) -> Result<Option<Vec<u8>>, GuestError> {
        let state = self.state.clone();
        let service = service.to_owned();
        tokio::task::spawn_blocking(move || match lock(&state).services.get_mut(&service) {
            Some(svc) => svc.guest.state().map(Some),
            None => Ok(None),
        })
        .await
        .unwrap_or_else(|e| Err(GuestError::Poisoned(format!("snapshot task failed: {e}"))))
    }

    /// A service's module, limits and instance history, for a trial (see [`crate::trial`]).
    pub fn running(&self, service: &str) -> Option<crate::trial::Running> {
        let st = lock(&self.state);
        let svc = st.services.get(service)?;
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

    /// The engine fingerprint of this node's runtime.
    pub fn engine(&self) -> String {
        lock(&self.state).runtime.fingerprint().to_owned()
    }

    /// Per-service observations for metrics, in name order.
    pub fn service_metrics(&self) -> Vec<ServiceMetrics> {
        let st = lock(&self.state);
        st.services
            .iter()
            .map(|(name, svc)| ServiceMetrics {
                name: name.clone(),
                version: svc.history.last().map_or(0, |r| r.version),
                fuel: svc.guest.fuel_total(),
                recoveries: svc.guest.recoveries(),
                stats: st.stats.get(name).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Checks that a backup loads (checksum, modules, every service accepts its state) without
    /// touching the live state. Returns the services it holds.
    pub async fn check_backup(&self, backup: Arc<Vec<u8>>) -> io::Result<Vec<String>> {
        let runtime = lock(&self.state).runtime.clone();
        tokio::task::spawn_blocking(move || {
            let reader = snapshot::Reader::from_bytes(&backup)?;
            let (_, services, _) = load_services(&runtime, reader)?;
            Ok(services.into_keys().collect())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Snapshots built and installed by this node.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        lock(&self.state).snapshots.clone()
    }

    /// What this replica learned from state audits (divergence checks).
    pub fn audit_status(&self) -> AuditStatus {
        lock(&self.state).audit.status.clone()
    }

    /// Lets a diverged replica heal through `healer` (the node's network); `None` stops it
    /// (the node is shutting down).
    pub fn set_healer(&self, healer: Option<Arc<dyn Healer>>) {
        *lock(&self.healer) = match healer {
            Some(h) => heal::HealerSlot::Ready(h),
            None => heal::HealerSlot::Closed,
        };
    }

    /// This replica's digest at an audit index, for the leader collecting votes.
    pub fn digest_at(&self, index: u64) -> DigestReply {
        let st = lock(&self.state);
        match st.digest_at(index) {
            Some(d) => DigestReply::Ready(d.clone()),
            None if st.last_applied.is_none_or(|l| l.index() < index) => DigestReply::NotYet {
                applied: st.last_applied.map_or(0, |l| l.index()),
            },
            None => DigestReply::Gone,
        }
    }

    /// Answers a diverged replica's request for the state it must rebuild.
    pub fn heal_source(&self, request: &HealRequest) -> HealReply {
        lock(&self.state).answer_heal(request)
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId> {
        lock(&self.state).last_applied
    }

    /// Every service's guest snapshot, by name: what replicas compare to prove they agree.
    pub async fn service_states(&self) -> io::Result<BTreeMap<String, Vec<u8>>> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let st = lock(&state);
            let mut out = BTreeMap::new();
            for (name, svc) in &st.services {
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
        lock(&self.state)
            .services
            .iter()
            .map(|(n, s)| ServiceInfo {
                version: s.history.last().map_or(0, |r| r.version),
                history: s.history.clone(),
                name: n.clone(),
                module: s.module.info().clone(),
                deployed_at: s.deployed_at,
            })
            .collect()
    }
}

/// openraft's state machine: applies entries to guests, builds and installs snapshots.
pub struct StateMachineStore {
    handle: StateHandle,
    dir: PathBuf,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

const CURRENT: &str = "current.snap";

impl StateMachineStore {
    /// A state machine whose snapshots live in `dir`, keeping the default history for
    /// watchers.
    pub fn new(runtime: Runtime, dir: &Path) -> io::Result<StateMachineStore> {
        Self::with_history(runtime, dir, HistoryLimits::default())
    }

    /// A state machine whose snapshots live in `dir`, keeping `history` for watchers.
    pub fn with_history(
        runtime: Runtime,
        dir: &Path,
        history: HistoryLimits,
    ) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(dir)?;
        let events = Arc::new(Events::new(history));
        Ok(StateMachineStore {
            handle: StateHandle {
                state: Arc::new(Mutex::new(SmState::new(runtime, events.clone()))),
                events,
                healer: Arc::default(),
            },
            dir: dir.to_path_buf(),
        })
    }

    /// A handle for queries and inspection.
    pub fn handle(&self) -> StateHandle {
        self.handle.clone()
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SmState) -> io::Result<R> + Send + 'static,
    ) -> io::Result<R> {
        let state = self.handle.state.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&state)))
            .await
            .map_err(|e| io::Error::other(format!("state machine task failed: {e}")))?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let st = lock(&self.handle.state);
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        let mut responses = Vec::with_capacity(batch.len());
        let mut pending = batch;
        loop {
            let (out, heal) = self.blocking(move |st| st.apply_entries(pending)).await?;
            responses.extend(out);
            let Some((plan, rest)) = heal else { break };
            self.heal(plan).await;
            pending = rest;
        }
        for (responder, response) in responders.into_iter().zip(responses) {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            handle: self.handle.clone(),
            dir: self.dir.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let current = self.dir.join(CURRENT);
        let incoming = snapshot.path.clone();
        let file = snapshot.file;
        let dir = self.dir.clone();
        self.blocking(move |st| {
            st.install(file.try_clone()?)?;
            if incoming != current {
                std::fs::rename(&incoming, &current)?;
                std::fs::File::open(&dir)?.sync_all()?;
            }
            Ok(())
        })
        .await?;
        tracing::info!(last = ?meta.last_log_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let path = self.dir.join(CURRENT);
        tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return Ok(None);
            }
            let file = SnapshotFile::open(&path)?;
            let reader = snapshot::Reader::open(file.file.try_clone()?)?;
            Ok(Some(Snapshot {
                meta: reader.header.meta,
                snapshot: file,
            }))
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Builds a snapshot of the state as it is when the builder runs.
#[derive(Debug)]
pub struct SnapshotBuilder {
    handle: StateHandle,
    dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let state = self.handle.state.clone();
        let path = self.dir.join(CURRENT);
        tokio::task::spawn_blocking(move || {
            // Capture under the lock (guest snapshots are in-memory copies), write outside it so
            // applies continue while the file is written.
            let started = std::time::Instant::now();
            let captured = lock(&state).capture()?;
            let modules: Vec<&[u8]> = captured.modules.iter().map(|m| m.as_slice()).collect();
            let states: Vec<&[u8]> = captured.states.iter().map(Vec::as_slice).collect();
            snapshot::write(&path, &captured.header, &modules, &states)?;
            let file = SnapshotFile::open(&path)?;
            {
                let s = &mut lock(&state).snapshots;
                s.built += 1;
                s.last_built_bytes = file.size;
                s.last_build_seconds = started.elapsed().as_secs_f64();
            }
            tracing::info!(
                last = ?captured.header.meta.last_log_id,
                bytes = file.size,
                "snapshot built"
            );
            Ok(Snapshot {
                meta: captured.header.meta,
                snapshot: file,
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}
