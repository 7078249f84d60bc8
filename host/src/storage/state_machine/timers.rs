//! Guest timers and events: what a 0.2.0 guest's effects do to the replicated state.
//!
//! Each service keeps its pending timers (replicated state: in snapshots, backups, heals and
//! audit digests). A guest sets or cancels them while it applies a command or a timer; a
//! `FireTimers` entry, proposed by the leader when one is due by its clock, delivers every
//! timer due at or before the entry's timestamp, oldest first (by due time, service, key), at
//! most [`MAX_FIRES_PER_ENTRY`] per entry. The entry's timestamp is the replicated clock, so
//! every replica delivers the same timers at the same entry, once, and none before it is due.
//! Events a guest emits are recorded with the entry for watchers.

use crate::runtime::{ApplyCtx, Effect};
use crate::storage::events::{Event, Outcome};
use crate::types::Response;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::SmState;

/// Most pending timers a service may have: a call that would leave more is refused.
pub const MAX_PENDING_TIMERS: usize = 10_000;
/// Most timers one `FireTimers` entry delivers; the rest wait for the next one.
pub const MAX_FIRES_PER_ENTRY: usize = 1_000;

/// Events a call emitted: topic and data, in order.
pub type Emitted = Vec<(String, Vec<u8>)>;

pub use crate::storage::snapshot::Timer;

/// A service's pending timers, by key and by due time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timers {
    by_key: BTreeMap<String, Timer>,
    by_due: BTreeSet<(u64, String)>,
}

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
            .map(|(k, t)| (k.clone(), t.clone()))
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

    fn set(&mut self, key: String, timer: Timer) {
        if let Some(old) = self.by_key.get(&key) {
            self.by_due.remove(&(old.at_ms, key.clone()));
        }
        self.by_due.insert((timer.at_ms, key.clone()));
        self.by_key.insert(key, timer);
    }

    fn cancel(&mut self, key: &str) {
        if let Some(old) = self.by_key.remove(key) {
            self.by_due.remove(&(old.at_ms, key.to_owned()));
        }
    }

    /// Removes and returns the earliest timer if it is due at `now_ms`.
    fn pop_due(&mut self, now_ms: u64) -> Option<(String, Timer)> {
        let (at, key) = self.by_due.first()?.clone();
        if at > now_ms {
            return None;
        }
        self.by_due.pop_first();
        let timer = self.by_key.remove(&key)?;
        Some((key, timer))
    }

    /// A digest of the table (folded into the service's audit digest when it is not empty).
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (key, t) in &self.by_key {
            h.update((key.len() as u64).to_le_bytes());
            h.update(key.as_bytes());
            h.update(t.at_ms.to_le_bytes());
            h.update((t.payload.len() as u64).to_le_bytes());
            h.update(&t.payload);
        }
        hex::encode(h.finalize())
    }

    /// Makes the timer changes of a call's `effects` (already checked) and returns the events
    /// it emitted, in order.
    pub fn apply(&mut self, effects: Vec<Effect>) -> Emitted {
        let mut emitted = Vec::new();
        for effect in effects {
            match effect {
                Effect::SetTimer {
                    key,
                    at_ms,
                    payload,
                } => self.set(key, Timer { at_ms, payload }),
                Effect::CancelTimer { key } => self.cancel(&key),
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
                    if !self.by_key.contains_key(key) {
                        added.insert(key);
                    }
                }
                Effect::CancelTimer { key } => {
                    added.remove(key.as_str());
                    if self.by_key.contains_key(key) {
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

impl SmState {
    /// Records the events a call of `service` at `ctx` emitted, in order, for watchers.
    pub(super) fn emitted(&mut self, service: &Arc<str>, ctx: ApplyCtx, emitted: Emitted) {
        for (topic, data) in emitted {
            self.local.pending_events.push(Event {
                index: ctx.index,
                service: service.clone(),
                timestamp_ms: ctx.timestamp_ms,
                payload: data,
                outcome: Outcome::Emitted(topic),
                memo: Default::default(),
            });
        }
    }

    /// Applies a `FireTimers` entry at `ctx`: delivers every timer due by its timestamp,
    /// oldest first, up to [`MAX_FIRES_PER_ENTRY`]. Only services whose guest can take timers
    /// are considered (a 0.1.0 guest swapped in keeps its service's timers pending, reported
    /// in the service list, until a 0.2.0 version serves again).
    pub(super) fn fire_timers(&mut self, ctx: ApplyCtx) -> Response {
        let mut fired = 0usize;
        let mut failed = 0usize;
        while fired + failed < MAX_FIRES_PER_ENTRY {
            // The earliest due timer over every service (ties: service name order).
            let next = self
                .rep
                .services
                .iter()
                .filter(|(_, s)| s.module.info().fires_timers())
                .filter_map(|(name, s)| s.timers.next_due().map(|at| (at, name)))
                .filter(|(at, _)| *at <= ctx.timestamp_ms)
                .min();
            let Some((_, name)) = next else { break };
            let name: Arc<str> = Arc::from(name.as_str());
            let svc = self
                .rep
                .services
                .get_mut(&*name)
                .expect("the service was just found");
            let Some((key, timer)) = svc.timers.pop_due(ctx.timestamp_ms) else {
                break;
            };
            let timers = &svc.timers;
            let mut check = |effects: &[Effect]| timers.check(effects);
            let (result, effects) = svc.guest.fire(ctx, &key, &timer.payload, &mut check);
            let emitted = svc.timers.apply(effects);
            let outcome = match result {
                Ok(()) => {
                    fired += 1;
                    Outcome::Fired(key)
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(service = %name, timer = %key, index = ctx.index, error = %e,
                        "a timer's delivery failed; the timer is dropped");
                    Outcome::Failed(format!("timer {key:?}: {e}"))
                }
            };
            let stats = self.local.stats.entry(name.to_string()).or_default();
            match outcome {
                Outcome::Fired(_) => stats.timers_fired += 1,
                _ => stats.timer_failures += 1,
            }
            self.local.pending_events.push(Event {
                index: ctx.index,
                service: name.clone(),
                timestamp_ms: ctx.timestamp_ms,
                payload: timer.payload,
                outcome,
                memo: Default::default(),
            });
            self.emitted(&name, ctx, emitted);
        }
        Response::TimersFired {
            fired: fired as u32,
            failed: failed as u32,
        }
    }

    /// The earliest due time of a timer some guest can take now.
    pub(super) fn next_timer_due(&self) -> Option<u64> {
        self.rep
            .services
            .values()
            .filter(|s| s.module.info().fires_timers())
            .filter_map(|s| s.timers.next_due())
            .min()
    }
}
