//! Timers: wake-ups a guest asks for while it applies an entry (`waft:fsm@0.2.0`).
//!
//! [`set`] names a timer and says when it is due, on the log's clock (the scale of
//! [`Context::timestamp_ms`](crate::Context)). The delay that makes (due time minus the
//! setting entry's timestamp) passes in real time, measured by the leader's monotonic clock,
//! whatever any node's wall clock says; then the leader proposes an entry that delivers the
//! timer (its timestamp at or after the due time), and every replica calls your
//! [`StateMachine::fire`](crate::StateMachine::fire) with it at that entry, once. Timers are
//! replicated state kept by waft (in its snapshots, backups and audits): your snapshot need not
//! hold them, and a hot-swap keeps them.
//!
//! Setting a timer is an effect of the call: it counts only if the call returns `Ok`. A
//! rejected command (`Err`) or a panic leaves every timer as it was.
//!
//! Limits (a call over one is refused as a whole, its changes undone, on every replica alike):
//! keys of at most 256 bytes, payloads of at most 64 KiB, 10,000 pending timers per service.
//!
//! In a native build (a guest's unit tests) the calls are recorded for
//! [`crate::testing::Native`] to deliver.

use crate::Context;

/// Sets (or replaces) the timer `key`, due at `at_ms` (milliseconds since the Unix epoch, on
/// the log's clock), delivered with `payload`. A time already past fires at the next timer
/// entry.
pub fn set(key: &str, at_ms: u64, payload: &[u8]) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::waft::fsm::timers::set(key, at_ms, payload);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record(crate::testing::Effect::SetTimer {
        key: key.to_owned(),
        at_ms,
        payload: payload.to_vec(),
    });
}

/// Sets the timer `key` due `delay_ms` after the entry being applied (`ctx`).
pub fn set_after(ctx: &Context, key: &str, delay_ms: u64, payload: &[u8]) {
    set(key, ctx.timestamp_ms.saturating_add(delay_ms), payload);
}

/// Cancels the timer `key` if it is pending (cancelling nothing is no error).
pub fn cancel(key: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::waft::fsm::timers::cancel(key);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record(crate::testing::Effect::CancelTimer {
        key: key.to_owned(),
    });
}
