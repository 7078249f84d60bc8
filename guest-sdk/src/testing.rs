//! Unit-test a guest natively and under waft's real runtime with the same calls.
//!
//! A [`Harness`] drives a [`Target`]: it numbers the entries it applies (index 1, 2, 3...),
//! stamps them with a clock you set, and checks what a guest must always satisfy (a snapshot
//! restored into a fresh instance snapshots to the same bytes). [`Native`] runs your
//! [`StateMachine`] type directly, as a plain Rust test; the `waft` crate's
//! `waft::testing::Component` runs the built `.wasm` in the runtime the nodes use (fuel, memory
//! limits, the deterministic WASI clocks and randomness), so one script can check both:
//!
//! ```
//! use waft_guest::testing::{Harness, Native, Target};
//! # use waft_guest::{Context, StateMachine};
//! # #[derive(Default)]
//! # struct Counter(u64);
//! # impl StateMachine for Counter {
//! #     fn apply(&mut self, _: &Context, c: &[u8]) -> Result<Vec<u8>, String> {
//! #         if c != b"add" { return Err("unknown command".into()); }
//! #         self.0 += 1;
//! #         Ok(self.0.to_string().into_bytes())
//! #     }
//! #     fn query(&self, _: &[u8]) -> Result<Vec<u8>, String> { Ok(self.0.to_string().into_bytes()) }
//! #     fn snapshot(&self) -> Vec<u8> { self.0.to_le_bytes().to_vec() }
//! #     fn restore(s: &[u8]) -> Result<Self, String> {
//! #         Ok(Counter(u64::from_le_bytes(s.try_into().map_err(|_| "bad snapshot")?)))
//! #     }
//! # }
//!
//! fn script<T: Target>(h: &mut Harness<T>) {
//!     assert_eq!(h.apply("add"), Ok(b"1".to_vec()));
//!     assert_eq!(h.apply("add"), Ok(b"2".to_vec()));
//!     assert!(h.apply("oops").is_err());
//!     assert_eq!(h.query("total"), Ok(b"2".to_vec()));
//!     h.assert_snapshot_roundtrip();
//! }
//!
//! script(&mut Harness::new(Native::<Counter>::default()));
//! // And in a test with `waft` as a dev-dependency, the same script on the component:
//! // script(&mut Harness::new(waft::testing::Component::load("target/.../counter.wasm")?));
//! ```

use crate::{Context, StateMachine};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// A timer set or cancelled, or an event emitted, by one call (see [`crate::timers`],
/// [`crate::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `timers::set`.
    SetTimer {
        /// The timer's name.
        key: String,
        /// When it is due.
        at_ms: u64,
        /// What `fire` gets.
        payload: Vec<u8>,
    },
    /// `timers::cancel`.
    CancelTimer {
        /// The timer's name.
        key: String,
    },
    /// `events::emit`.
    Emit {
        /// The event's topic.
        topic: String,
        /// Its data.
        data: Vec<u8>,
    },
}

thread_local! {
    /// Effects of the native call in progress (natively, `timers` and `events` write here).
    static EFFECTS: RefCell<Vec<Effect>> = const { RefCell::new(Vec::new()) };
}

/// Records an effect of the native call in progress.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record(effect: Effect) {
    EFFECTS.with(|e| e.borrow_mut().push(effect));
}

fn take_recorded() -> Vec<Effect> {
    EFFECTS.with(|e| std::mem::take(&mut *e.borrow_mut()))
}

/// An event a guest emitted, as a [`Harness`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The index of the entry that emitted it.
    pub index: u64,
    /// Its topic.
    pub topic: String,
    /// Its data.
    pub data: Vec<u8>,
}

/// Where a guest runs: natively ([`Native`]) or as a component in waft's runtime.
pub trait Target {
    /// A fresh instance of the same guest (empty state).
    fn fresh(&self) -> Self
    where
        Self: Sized;
    /// Applies one entry. `Err` is a rejection or a trap, in words.
    fn apply(
        &mut self,
        index: u64,
        term: u64,
        timestamp_ms: u64,
        command: &[u8],
    ) -> Result<Vec<u8>, String>;
    /// Answers a read-only request.
    fn query(&mut self, request: &[u8]) -> Result<Vec<u8>, String>;
    /// The state's canonical bytes.
    fn snapshot(&mut self) -> Result<Vec<u8>, String>;
    /// Replaces the state with one from [`Target::snapshot`].
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
    /// Delivers the timer `key` (the guest's `fire`) in the entry given.
    fn fire(
        &mut self,
        index: u64,
        term: u64,
        timestamp_ms: u64,
        key: &str,
        payload: &[u8],
    ) -> Result<(), String>;
    /// The effects of the last `apply` or `fire`, if it succeeded (none after an `Err`).
    fn take_effects(&mut self) -> Vec<Effect>;
}

/// Your [`StateMachine`] type, run directly.
#[derive(Debug, Default)]
pub struct Native<S: StateMachine>(pub S, Vec<Effect>);

impl<S: StateMachine> Native<S> {
    /// Runs `state`.
    pub fn new(state: S) -> Native<S> {
        Native(state, Vec::new())
    }

    /// Makes one replicated call (an apply, a fire) with the context given: its effects are
    /// kept when it succeeds. A failed call must leave the state unchanged (the runtime rolls
    /// back every effect of a failed call; natively, that is the guest's promise): checked
    /// here, and `what` names the call when it did not.
    fn call<T>(
        &mut self,
        (index, term, timestamp_ms): (u64, u64, u64),
        what: impl FnOnce() -> String,
        call: impl FnOnce(&mut S, &Context) -> Result<T, String>,
    ) -> Result<T, String> {
        let ctx = Context {
            index,
            term,
            timestamp_ms,
        };
        let before = self.0.snapshot();
        take_recorded();
        let result = call(&mut self.0, &ctx);
        let effects = take_recorded();
        self.1 = if result.is_ok() { effects } else { Vec::new() };
        if result.is_err() && self.0.snapshot() != before {
            panic!(
                "{} returned Err but changed the state: a refused call must leave the state as \
                 it was",
                what()
            );
        }
        result
    }
}

impl<S: StateMachine> Target for Native<S> {
    fn fresh(&self) -> Self {
        Native::new(S::default())
    }

    fn fire(
        &mut self,
        index: u64,
        term: u64,
        timestamp_ms: u64,
        key: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        self.call(
            (index, term, timestamp_ms),
            || format!("fire of timer {key:?}"),
            |s, ctx| s.fire(ctx, key, payload),
        )
    }

    fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.1)
    }

    fn apply(
        &mut self,
        index: u64,
        term: u64,
        timestamp_ms: u64,
        command: &[u8],
    ) -> Result<Vec<u8>, String> {
        self.call(
            (index, term, timestamp_ms),
            || {
                format!(
                    "apply of entry {index} ({:?})",
                    String::from_utf8_lossy(command)
                )
            },
            |s, ctx| s.apply(ctx, command),
        )
    }

    fn query(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.0.query(request)
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.0.snapshot())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.0 = S::restore(snapshot)?;
        Ok(())
    }
}

/// Drives a [`Target`] the way a node does: entries numbered from 1 in term 1, stamped with the
/// harness's clock ([`Harness::set_time`], [`Harness::advance`]; it never goes back).
#[derive(Debug)]
pub struct Harness<T: Target> {
    target: T,
    next_index: u64,
    term: u64,
    now_ms: u64,
    /// Pending timers, as the host keeps them: key → (due, payload).
    timers: BTreeMap<String, (u64, Vec<u8>)>,
    /// Events emitted and not yet taken.
    events: Vec<Emitted>,
}

impl<T: Target> Harness<T> {
    /// A harness on `target`, clock at 1,700,000,000,000 ms (late 2023).
    pub fn new(target: T) -> Harness<T> {
        Harness {
            target,
            next_index: 1,
            term: 1,
            now_ms: 1_700_000_000_000,
            timers: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    /// Makes the effects of the call that just succeeded at `index`, as the host does.
    fn take_effects(&mut self, index: u64) {
        for effect in self.target.take_effects() {
            match effect {
                Effect::SetTimer {
                    key,
                    at_ms,
                    payload,
                } => {
                    self.timers.insert(key, (at_ms, payload));
                }
                Effect::CancelTimer { key } => {
                    self.timers.remove(&key);
                }
                Effect::Emit { topic, data } => self.events.push(Emitted { index, topic, data }),
            }
        }
    }

    /// The pending timers: key, due time, payload, in key order.
    pub fn pending_timers(&self) -> Vec<(String, u64, Vec<u8>)> {
        self.timers
            .iter()
            .map(|(k, (at, p))| (k.clone(), *at, p.clone()))
            .collect()
    }

    /// The events emitted since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Emitted> {
        std::mem::take(&mut self.events)
    }

    /// Delivers every timer due by the clock now, oldest first (ties by key), in one new entry,
    /// as a node's timer entry does; returns each key with the guest's answer.
    pub fn fire_due(&mut self) -> Vec<(String, Result<(), String>)> {
        let index = self.next_index;
        self.next_index += 1;
        let mut out = Vec::new();
        loop {
            let next = self
                .timers
                .iter()
                .filter(|(_, (at, _))| *at <= self.now_ms)
                .min_by_key(|(k, (at, _))| (*at, (*k).clone()))
                .map(|(k, _)| k.clone());
            let Some(key) = next else { break };
            let (_, payload) = self.timers.remove(&key).expect("found above");
            let result = self
                .target
                .fire(index, self.term, self.now_ms, &key, &payload);
            if result.is_ok() {
                self.take_effects(index);
            } else {
                self.target.take_effects();
            }
            out.push((key, result));
        }
        out
    }

    /// The target, for calls the harness does not wrap.
    pub fn target(&mut self) -> &mut T {
        &mut self.target
    }

    /// The index the next entry gets.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Sets the leader's clock for the next entries (it never goes back: an earlier time is
    /// refused, as a leader's clock stamps are).
    pub fn set_time(&mut self, ms: u64) {
        assert!(
            ms >= self.now_ms,
            "entry timestamps never decrease ({ms} < {})",
            self.now_ms
        );
        self.now_ms = ms;
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    /// Starts a new term (a leader change) for the next entries.
    pub fn new_term(&mut self) {
        self.term += 1;
    }

    /// Applies `command` as the next entry.
    pub fn apply(&mut self, command: impl AsRef<[u8]>) -> Result<Vec<u8>, String> {
        let index = self.next_index;
        self.next_index += 1;
        let result = self
            .target
            .apply(index, self.term, self.now_ms, command.as_ref());
        if result.is_ok() {
            self.take_effects(index);
        } else {
            self.target.take_effects();
        }
        result
    }

    /// Asks a read-only `request`.
    pub fn query(&mut self, request: impl AsRef<[u8]>) -> Result<Vec<u8>, String> {
        self.target.query(request.as_ref())
    }

    /// The state's snapshot; panics if the guest fails to make one.
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.target
            .snapshot()
            .unwrap_or_else(|e| panic!("snapshot failed: {e}"))
    }

    /// Checks that the state survives a snapshot: restored into a fresh instance, it snapshots
    /// to the same bytes (what every replica that installs a snapshot relies on). The harness
    /// goes on with the restored instance, as a node that installed the snapshot would.
    pub fn assert_snapshot_roundtrip(&mut self) {
        let first = self.snapshot();
        let mut fresh = self.target.fresh();
        fresh
            .restore(&first)
            .unwrap_or_else(|e| panic!("restoring the guest's own snapshot failed: {e}"));
        let second = fresh
            .snapshot()
            .unwrap_or_else(|e| panic!("snapshot after restore failed: {e}"));
        assert!(
            first == second,
            "the restored instance snapshots to different bytes ({} vs {} bytes): the snapshot is \
             not canonical, or restore loses state",
            first.len(),
            second.len()
        );
        self.target = fresh;
    }
}
