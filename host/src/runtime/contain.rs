//! Host faults inside a guest call become a trap of that call, not a stopped node.
//!
//! A guest call runs host code: waft's bindings, the WASI host functions, the effect log, the
//! resource limiter. A panic there (a bug of waft's or of wasmtime-wasi's) unwinds out of the
//! call: wasmtime catches it at the wasm boundary and resumes it once the call has returned.
//! Every replica applies the same entry, so left alone such a panic would stop every replica at
//! the same index. [`call`] catches it and turns it into a [`HostFault`] error of that call,
//! which the guest runtime treats as a trap (the instance is rebuilt from its history and the
//! call has no effect), reported as a host fault rather than as the guest's doing.
//!
//! Architecture invariant: every entry into guest code goes through [`call`] (`bindings.rs` is
//! the only place that calls a guest export or instantiates a guest).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

/// A panic in host code reached from a guest call, caught at the call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("waft's host code failed during the call (a host fault, not the guest's doing): {0}")]
pub struct HostFault(pub String);

/// Host faults caught since the process started (all guests; metrics).
static CAUGHT: AtomicU64 = AtomicU64::new(0);

/// Host faults caught in guest calls since the process started.
pub fn host_faults() -> u64 {
    CAUGHT.load(Ordering::Relaxed)
}

/// Runs one guest call (or an instantiation); a panic inside it becomes a [`HostFault`] error.
///
/// Unwind safety: the store the call ran on may be left anywhere by the panic, so a caller
/// must treat the error as a trap and never enter that instance again (the guest runtime
/// replaces the instance after every trap).
pub(super) fn call<T>(f: impl FnOnce() -> wasmtime::Result<T>) -> wasmtime::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            CAUGHT.fetch_add(1, Ordering::Relaxed);
            let what = panic_message(payload.as_ref());
            tracing::error!(
                fault = what,
                "host fault in a guest call, contained as a trap"
            );
            Err(wasmtime::Error::new(HostFault(what)))
        }
    }
}

/// What a caught panic says (its message, when it has one).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
