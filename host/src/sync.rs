//! Locking: the one place that decides what a poisoned lock (a holder panicked) means. Every
//! std lock in host/src is taken through these functions (`tests/all/tidy.rs` checks it), and
//! each name says what happens on poison:
//!
//! - [`lock_anyway`], [`try_lock_anyway`], [`read_anyway`], [`write_anyway`]: the data stays consistent whatever a
//!   panicking holder was doing (counters, caches, connection pools, output buffers), so a
//!   poisoned lock is used as it is.
//! - [`lock_or_stop`], [`try_lock_or_stop`]: replicated state (the state machine, the Raft
//!   log's in-memory side). A poisoned lock means a change was interrupted half-way, so the
//!   caller panics too and the node stops rather than diverge.

use std::sync::TryLockError;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks data that stays consistent whatever a panicking holder was doing: a poisoned lock is
/// used as it is.
pub(crate) fn lock_anyway<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`lock_anyway`] without waiting: `None` when another thread holds the lock.
pub(crate) fn try_lock_anyway<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::WouldBlock) => None,
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
    }
}

/// [`lock_anyway`] for reading an `RwLock`.
pub(crate) fn read_anyway<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// [`lock_anyway`] for writing an `RwLock`.
pub(crate) fn write_anyway<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
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
