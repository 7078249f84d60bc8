//! Locking: one place that decides what a poisoned lock (a holder panicked) means.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks data that stays consistent whatever a panicking holder was doing (counters, caches,
/// connection pools, output buffers): a poisoned lock is used as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Locks replicated state (the state machine, the Raft log's in-memory side). A poisoned lock
/// means a panic interrupted a change half-way: carrying on could make this replica diverge, so
/// this panics too, which fails the caller (an apply or a log write fails, and openraft stops
/// the node: it restarts from its durable log and snapshot).
pub(crate) fn lock_or_stop<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(_) => panic!(
            "a panic interrupted a change to replicated state (its lock is poisoned); stopping \
             rather than carrying on from a half-made change"
        ),
    }
}
