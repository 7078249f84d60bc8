//! What a 0.2.0 guest asks of the host while it applies an entry: timers set or cancelled and
//! events emitted (`waft:fsm/timers`, `waft:fsm/events`).
//!
//! The host functions only write these down, in order, for the call in progress. They are the
//! call's *effects*: the guest runtime hands them to the caller only when the call returned
//! `ok` (see `Guest::apply_effects`), and discards them after a rejection, a trap, or any call
//! that is not an apply or a fire (queries, snapshots, the replays of recovery). What they do to
//! replicated state is the state machine's business, so every replica, given the same calls,
//! makes the same changes.

use super::bindings::v2::waft::fsm::{events, timers};

/// Longest timer key, bytes.
pub const MAX_TIMER_KEY_BYTES: usize = 256;
/// Largest timer payload, bytes.
pub const MAX_TIMER_PAYLOAD_BYTES: usize = 64 << 10;
/// Largest event (topic and data), bytes: room for an etcd value at etcd's request limit with
/// the value it replaced.
pub const MAX_EVENT_BYTES: usize = 4 << 20;
/// Most event bytes one call may emit.
pub const MAX_EVENT_BYTES_PER_CALL: usize = 16 << 20;
/// Most events one call may emit.
pub const MAX_EVENTS_PER_CALL: usize = 1000;
/// Most timer operations (sets and cancels) one call may make.
pub const MAX_TIMER_OPS_PER_CALL: usize = 10_000;

/// One effect of a call, in the order the guest made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `timers.set`: the timer `key` is due at `at_ms` with `payload` (replacing one of that key).
    SetTimer {
        key: String,
        at_ms: u64,
        payload: Vec<u8>,
    },
    /// `timers.cancel`.
    CancelTimer { key: String },
    /// `events.emit`.
    Emit { topic: String, data: Vec<u8> },
}

/// The effects of the call in progress, and the first cap it broke, if any (then nothing more
/// is recorded and the call will be refused).
#[derive(Debug, Default)]
pub(super) struct EffectLog {
    pub(super) list: Vec<Effect>,
    pub(super) over: Option<String>,
    events: usize,
    event_bytes: usize,
    timer_ops: usize,
}

impl EffectLog {
    /// Forgets everything (a new call begins).
    pub(super) fn clear(&mut self) {
        self.list.clear();
        self.over = None;
        self.events = 0;
        self.event_bytes = 0;
        self.timer_ops = 0;
    }

    fn refuse(&mut self, why: String) {
        if self.over.is_none() {
            self.over = Some(why);
        }
        self.list.clear();
    }

    fn timer_op(&mut self, key: &str) -> bool {
        if self.over.is_some() {
            return false;
        }
        self.timer_ops += 1;
        if self.timer_ops > MAX_TIMER_OPS_PER_CALL {
            self.refuse(format!(
                "the call made more than {MAX_TIMER_OPS_PER_CALL} timer operations"
            ));
            return false;
        }
        if key.len() > MAX_TIMER_KEY_BYTES {
            self.refuse(format!(
                "a timer key of {} bytes is over the {MAX_TIMER_KEY_BYTES}-byte limit",
                key.len()
            ));
            return false;
        }
        true
    }
}

/// `waft:fsm/timers`, linked over each store's effect log (`wasi::add_to_linker`).
impl timers::Host for EffectLog {
    fn set(&mut self, key: String, at_ms: u64, payload: Vec<u8>) {
        let log = self;
        if !log.timer_op(&key) {
            return;
        }
        if payload.len() > MAX_TIMER_PAYLOAD_BYTES {
            log.refuse(format!(
                "the payload of timer {key:?} ({} bytes) is over the {MAX_TIMER_PAYLOAD_BYTES}-byte limit",
                payload.len()
            ));
            return;
        }
        log.list.push(Effect::SetTimer {
            key,
            at_ms,
            payload,
        });
    }

    fn cancel(&mut self, key: String) {
        let log = self;
        if log.timer_op(&key) {
            log.list.push(Effect::CancelTimer { key });
        }
    }
}

/// `waft:fsm/events`, linked like the timers.
impl events::Host for EffectLog {
    fn emit(&mut self, topic: String, data: Vec<u8>) {
        let log = self;
        if log.over.is_some() {
            return;
        }
        log.events += 1;
        if log.events > MAX_EVENTS_PER_CALL {
            log.refuse(format!(
                "the call emitted more than {MAX_EVENTS_PER_CALL} events"
            ));
            return;
        }
        let size = topic.len() + data.len();
        if size > MAX_EVENT_BYTES {
            log.refuse(format!(
                "an event of {size} bytes (topic {topic:?}) is over the {MAX_EVENT_BYTES}-byte limit"
            ));
            return;
        }
        log.event_bytes += size;
        if log.event_bytes > MAX_EVENT_BYTES_PER_CALL {
            log.refuse(format!(
                "the call emitted more than {MAX_EVENT_BYTES_PER_CALL} bytes of events"
            ));
            return;
        }
        log.list.push(Effect::Emit { topic, data });
    }
}
