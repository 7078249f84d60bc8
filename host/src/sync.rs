//! Locking: one place that decides what a poisoned lock (a holder panicked) means.

use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

/// Locks data that stays consistent whatever a panicking holder was doing (counters, caches,
/// connection pools, output buffers): a poisoned lock is used as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a node stops on a poisoned lock of replicated state.
const POISONED: &str = "a panic interrupted a change to replicated state (its lock is poisoned); \
                        stopping rather than carrying on from a half-made change";

/// Locks replicated state (the state machine, the Raft log's in-memory side). A poisoned lock
/// means a panic interrupted a change half-way: carrying on could make this replica diverge, so
/// this panics too, which fails the caller (an apply or a log write fails, and openraft stops
/// the node: it restarts from its durable log and snapshot).
pub(crate) fn lock_or_stop<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(_) => panic!("{POISONED}"),
    }
}

/// [`lock_or_stop`] without waiting: `None` when another thread holds the lock.
pub(crate) fn try_lock_or_stop<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::WouldBlock) => None,
        Err(TryLockError::Poisoned(_)) => panic!("{POISONED}"),
    }
}
