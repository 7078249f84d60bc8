//! Guest timers and events: what a 0.2.0 guest's effects do to the replicated state.
//!
//! Each service keeps its pending timers (replicated state: in snapshots, backups, heals and
//! audit digests), each with the entry that set it and the log's clock then. A guest sets or
//! cancels them while it applies a command or a timer.
//!
//! When a timer falls due is a matter of real time, not of any node's wall clock: each node
//! reckons, on its own monotonic clock, a deadline for every pending timer: the moment it
//! learned of the timer (applied the entry that set it, or loaded it from a snapshot, a heal
//! or a restart) plus the delay the guest asked for (`at_ms - set_ms`). A node learns of a
//! timer only once the entry that set it is committed, so no deadline falls earlier, in real
//! time, than the delay after the timer was set, whatever any wall clock says. The leader
//! proposes a `FireDue` entry naming the timers whose deadlines passed on its clock (see
//! `crate::timers`); every replica delivers exactly those (if still pending as that setting)
//! at that entry, once, and the entry's clock is moved up to their due times, so a guest never
//! sees a timer fire before its `at_ms` by the log's clock either. Logs written before this
//! carry `FireTimers` entries, which deliver the timers due by the entry's clock alone.
//! Events a guest emits are recorded with the entry for watchers.

use crate::runtime::{ApplyCtx, Effect};
use crate::storage::events::{Event, Outcome};
use crate::types::{Response, TimerRef};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Env, Replicated};

/// Most pending timers a service may have: a call that would leave more is refused.
pub const MAX_PENDING_TIMERS: usize = 10_000;
/// Most timers one `FireDue` (or `FireTimers`) entry delivers; the rest wait for the next one.
pub const MAX_FIRES_PER_ENTRY: usize = 1_000;

/// Events a call emitted: topic and data, in order.
pub type Emitted = Vec<(String, Vec<u8>)>;

pub use crate::storage::snapshot::Timer;

/// Longest delay a node reckons with (a timer set further out waits this long, ~100 years).
const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A service's pending timers, by key and by due time (the log's clock), and when each falls
/// due on this node's monotonic clock.
#[derive(Debug, Clone, Default)]
pub struct Timers {
    by_key: BTreeMap<String, Pending>,
    by_due: BTreeSet<(u64, String)>,
    /// This node's reckoning (never replicated, never compared): deadlines by key.
    by_deadline: BTreeSet<(Instant, String)>,
}

/// A pending timer and this node's deadline for it.
#[derive(Debug, Clone)]
struct Pending {
    timer: Timer,
    deadline: Instant,
}

/// Replicas compare the timers, never a node's deadlines.
impl PartialEq for Timers {
    fn eq(&self, other: &Timers) -> bool {
        self.by_key.len() == other.by_key.len()
            && self
                .by_key
                .iter()
                .zip(&other.by_key)
                .all(|((ka, a), (kb, b))| ka == kb && a.timer == b.timer)
    }
}

impl Eq for Timers {}

impl Timers {
    /// Builds the table from its records (a snapshot's, a heal's).
    pub fn from_records(records: Vec<(String, Timer)>) -> Timers {
        let mut t = Timers::default();
        for (key, timer) in records {
            t.set(key, timer);
        }
        t
    }

    /// Every timer, by key: what snapshots and heals carry.
    pub fn records(&self) -> Vec<(String, Timer)> {
        self.by_key
            .iter()
            .map(|(k, p)| (k.clone(), p.timer.clone()))
            .collect()
    }

    /// How many are pending.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The earliest due time.
    pub fn next_due(&self) -> Option<u64> {
        self.by_due.first().map(|(at, _)| *at)
    }

    /// When the earliest pending timer falls due on this node's monotonic clock.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(at, _)| *at)
    }

    /// The timers whose deadlines on this node passed by `now`, earliest first, at most `max`:
    /// deadline, key and the entry that set it.
    pub fn due_by(&self, now: Instant, max: usize) -> Vec<(Instant, String, u64)> {
        self.by_deadline
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(max)
            .map(|(at, key)| (*at, key.clone(), self.by_key[key].timer.set_index))
            .collect()
    }

    /// Sets (or replaces) the timer `key`. This node learns of it now: its deadline here is
    /// now plus the delay the guest asked for.
    fn set(&mut self, key: String, timer: Timer) {
        self.cancel(&key);
        let delay = Duration::from_millis(timer.delay_ms()).min(MAX_DELAY);
        let deadline = Instant::now() + delay;
        self.by_due.insert((timer.at_ms, key.clone()));
        self.by_deadline.insert((deadline, key.clone()));
        self.by_key.insert(key, Pending { timer, deadline });
    }

    fn cancel(&mut self, key: &str) -> Option<Timer> {
        let old = self.by_key.remove(key)?;
        self.by_due.remove(&(old.timer.at_ms, key.to_owned()));
        self.by_deadline.remove(&(old.deadline, key.to_owned()));
        Some(old.timer)
    }

    /// Removes and returns the timer `key` if it is pending as the setting made at `set_index`.
    fn take(&mut self, key: &str, set_index: u64) -> Option<Timer> {
        if self.by_key.get(key)?.timer.set_index != set_index {
            return None;
        }
        self.cancel(key)
    }

    /// The due time (log's clock) of the timer `key` if it is pending as the setting made at
    /// `set_index`.
    fn due_of(&self, key: &str, set_index: u64) -> Option<u64> {
        let p = self.by_key.get(key)?;
        (p.timer.set_index == set_index).then_some(p.timer.at_ms)
    }

    /// Removes and returns the earliest timer if it is due at `log_ms` by the log's clock
    /// (what a `FireTimers` entry of an older log delivers).
    fn pop_due(&mut self, log_ms: u64) -> Option<(String, Timer)> {
        let (at, key) = self.by_due.first()?.clone();
        if at > log_ms {
            return None;
        }
        let timer = self.cancel(&key)?;
        Some((key, timer))
    }

    /// A digest of the table (folded into the service's audit digest when it is not empty).
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (key, p) in &self.by_key {
            let t = &p.timer;
            h.update((key.len() as u64).to_le_bytes());
            h.update(key.as_bytes());
            h.update(t.at_ms.to_le_bytes());
            h.update((t.payload.len() as u64).to_le_bytes());
            h.update(&t.payload);
            h.update(t.set_index.to_le_bytes());
            h.update(t.set_ms.to_le_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Makes the timer changes of a call at `ctx`'s entry's `effects` (already checked) and
    /// returns the events it emitted, in order.
    pub fn apply(&mut self, ctx: ApplyCtx, effects: Vec<Effect>) -> Emitted {
        let mut emitted = Vec::new();
        for effect in effects {
            match effect {
                Effect::SetTimer {
                    key,
                    at_ms,
                    payload,
                } => self.set(
                    key,
                    Timer {
                        at_ms,
                        payload,
                        set_index: ctx.index,
                        set_ms: ctx.timestamp_ms,
                    },
                ),
                Effect::CancelTimer { key } => {
                    self.cancel(&key);
                }
                Effect::Emit { topic, data } => emitted.push((topic, data)),
            }
        }
        emitted
    }

    /// Whether applying `effects` would leave more than [`MAX_PENDING_TIMERS`] pending: the
    /// check a call's effects must pass (exact, so the same on every replica).
    pub fn check(&self, effects: &[Effect]) -> Result<(), String> {
        let mut added: BTreeSet<&str> = BTreeSet::new();
        let mut removed: BTreeSet<&str> = BTreeSet::new();
        for e in effects {
            match e {
                Effect::SetTimer { key, .. } => {
                    removed.remove(key.as_str());
                    if !self.by_key.contains_key(key.as_str()) {
                        added.insert(key);
                    }
                }
                Effect::CancelTimer { key } => {
                    added.remove(key.as_str());
                    if self.by_key.contains_key(key.as_str()) {
                        removed.insert(key);
                    }
                }
                Effect::Emit { .. } => {}
            }
        }
        let after = self.by_key.len() + added.len() - removed.len();
        if after > MAX_PENDING_TIMERS && !added.is_empty() {
            return Err(format!(
                "the service would have {after} pending timers, over its limit of \
                 {MAX_PENDING_TIMERS}; the command was undone"
            ));
        }
        Ok(())
    }
}

impl Replicated {
    /// Records the events a call of `service` at `ctx` emitted, in order, for watchers.
    pub(super) fn emitted(
        &mut self,
        env: &mut Env<'_>,
        service: &Arc<str>,
        ctx: ApplyCtx,
        emitted: Emitted,
    ) {
        for (topic, data) in emitted {
            env.seen.pending_events.push(Event {
                index: ctx.index,
                service: service.clone(),
                timestamp_ms: ctx.timestamp_ms,
                payload: data,
                outcome: Outcome::Emitted(topic),
                memo: Default::default(),
            });
        }
    }
    /// Applies a `FireDue` entry: delivers the timers it names (those still pending as the
    /// setting it names, of a service whose guest can take timers), in its order, up to
    /// [`MAX_FIRES_PER_ENTRY`]. The call's clock is the entry's, moved up to the latest due
    /// time among them (see the module doc).
    pub(super) fn fire_due(
        &mut self,
        env: &mut Env<'_>,
        index: u64,
        term: u64,
        timestamp_ms: u64,
        timers: &[TimerRef],
    ) -> Response {
        let timers = &timers[..timers.len().min(MAX_FIRES_PER_ENTRY)];
        let latest = timers
            .iter()
            .filter_map(|r| {
                let svc = self.services.get(&r.service)?;
                svc.timers.due_of(&r.key, r.set_index)
            })
            .max()
            .unwrap_or(0);
        let ctx = ApplyCtx {
            index,
            term,
            timestamp_ms: self.advance_clock(timestamp_ms.max(latest)),
        };
        let (mut fired, mut failed) = (0u32, 0u32);
        for r in timers {
            let Some(svc) = self.services.get_mut(&r.service) else {
                continue;
            };
            if !svc.module.info().fires_timers() {
                continue;
            }
            // Gone (cancelled, set again, or delivered by an earlier timer's call): nothing.
            let Some(timer) = svc.timers.take(&r.key, r.set_index) else {
                continue;
            };
            let name: Arc<str> = Arc::from(r.service.as_str());
            if self.deliver(env, ctx, name, r.key.clone(), timer) {
                fired += 1;
            } else {
                failed += 1;
            }
        }
        Response::TimersFired { fired, failed }
    }
    /// Applies a `FireTimers` entry (written by a build before `FireDue`) at `ctx`: delivers
    /// every timer due by its timestamp on the log's clock, oldest first, up to
    /// [`MAX_FIRES_PER_ENTRY`]. Only services whose guest can take timers are considered (a
    /// 0.1.0 guest swapped in keeps its service's timers pending, reported in the service
    /// list, until a 0.2.0 version serves again).
    pub(super) fn fire_timers(&mut self, env: &mut Env<'_>, ctx: ApplyCtx) -> Response {
        let (mut fired, mut failed) = (0u32, 0u32);
        while ((fired + failed) as usize) < MAX_FIRES_PER_ENTRY {
            // The earliest due timer over every service (ties: service name order).
            let next = self
                .services
                .iter()
                .filter(|(_, s)| s.module.info().fires_timers())
                .filter_map(|(name, s)| s.timers.next_due().map(|at| (at, name)))
                .filter(|(at, _)| *at <= ctx.timestamp_ms)
                .min();
            let Some((_, name)) = next else { break };
            let name: Arc<str> = Arc::from(name.as_str());
            let svc = self
                .services
                .get_mut(&*name)
                .expect("the service was just found");
            let Some((key, timer)) = svc.timers.pop_due(ctx.timestamp_ms) else {
                break;
            };
            if self.deliver(env, ctx, name, key, timer) {
                fired += 1;
            } else {
                failed += 1;
            }
        }
        Response::TimersFired { fired, failed }
    }
    /// Calls `service`'s guest's `fire` with a timer already taken off its table, makes the
    /// call's effects and records what happened for watchers. Whether it was delivered.
    fn deliver(
        &mut self,
        env: &mut Env<'_>,
        ctx: ApplyCtx,
        name: Arc<str>,
        key: String,
        timer: Timer,
    ) -> bool {
        let svc = self
            .services
            .get_mut(&*name)
            .expect("the caller found the service");
        let timers = &svc.timers;
        let mut check = |effects: &[Effect]| timers.check(effects);
        let (result, effects) = svc.guest.fire(ctx, &key, &timer.payload, &mut check);
        let emitted = svc.timers.apply(ctx, effects);
        let stats = env.seen.stats.entry(name.to_string()).or_default();
        let outcome = match result {
            Ok(()) => {
                stats.timers_fired += 1;
                Outcome::Fired(key)
            }
            Err(e) => {
                stats.timer_failures += 1;
                tracing::warn!(service = %name, timer = %key, index = ctx.index, error = %e,
                    "a timer's delivery failed; the timer is dropped");
                Outcome::Failed(format!("timer {key:?}: {e}"))
            }
        };
        let delivered = matches!(outcome, Outcome::Fired(_));
        env.seen.pending_events.push(Event {
            index: ctx.index,
            service: name.clone(),
            timestamp_ms: ctx.timestamp_ms,
            payload: timer.payload,
            outcome,
            memo: Default::default(),
        });
        self.emitted(env, &name, ctx, emitted);
        delivered
    }
    /// The timers whose deadlines on this node passed by `now`, of services whose guest can
    /// take them, earliest first, at most [`MAX_FIRES_PER_ENTRY`]: what the leader names in
    /// a `FireDue` entry.
    pub(super) fn due_timers(&self, now: Instant) -> Vec<TimerRef> {
        let mut due: Vec<(Instant, TimerRef)> = Vec::new();
        for (name, svc) in &self.services {
            if !svc.module.info().fires_timers() {
                continue;
            }
            for (at, key, set_index) in svc.timers.due_by(now, MAX_FIRES_PER_ENTRY) {
                due.push((
                    at,
                    TimerRef {
                        service: name.clone(),
                        key,
                        set_index,
                    },
                ));
            }
        }
        due.sort_by_key(|(at, _)| *at);
        due.truncate(MAX_FIRES_PER_ENTRY);
        due.into_iter().map(|(_, r)| r).collect()
    }
    /// When the earliest pending timer some guest can take falls due on this node's clock.
    pub(super) fn next_timer_deadline(&self) -> Option<Instant> {
        self.services
            .values()
            .filter(|s| s.module.info().fires_timers())
            .filter_map(|s| s.timers.next_deadline())
            .min()
    }
}
