//! The leader's side of guest timers: it proposes a [`Request::FireTimers`] entry whenever a
//! pending timer is due by its clock.
//!
//! Timers are replicated state (see `storage::state_machine::timers`); this task only decides
//! *when* to ask for their delivery. Whatever node leads does it, so timers keep firing across
//! leader changes and restarts: a new leader sees the overdue ones at once. Two proposals for
//! the same timers are harmless: the second entry finds nothing due. The entry's timestamp is
//! the leader's clock (never behind the log's), and a timer is delivered only by an entry whose
//! timestamp has reached its due time, so no replica ever delivers one early by the log's clock.

use crate::Raft;
use crate::storage::StateHandle;
use crate::types::{Request, now_ms};
use std::time::Duration;

/// Longest sleep between two looks. A change of the earliest due time wakes the task at once;
/// this bounds how long a node that just became leader takes to see overdue timers.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Spawns the task for this node.
pub fn spawn(raft: Raft, state: StateHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut due = state.timer_due();
        loop {
            let leads = {
                use openraft::async_runtime::WatchReceiver;
                raft.metrics().borrow_watched().state.is_leader()
            };
            let next = *due.borrow_and_update();
            let wait = match next.filter(|_| leads) {
                Some(at) => {
                    let now = now_ms();
                    if at <= now {
                        match raft
                            .client_write(Request::FireTimers { timestamp_ms: now })
                            .await
                        {
                            Ok(_) => continue,
                            Err(e) => {
                                tracing::debug!(error = %e, "could not propose due timers");
                                Duration::from_millis(100)
                            }
                        }
                    } else {
                        Duration::from_millis(at - now).min(MAX_WAIT)
                    }
                }
                None => MAX_WAIT,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = due.changed() => if changed.is_err() { return },
            }
        }
    })
}
