//! The leader's side of guest timers: it proposes a [`Request::FireDue`] entry naming the
//! timers whose deadlines passed on its monotonic clock.
//!
//! Timers are replicated state (see `storage::state_machine::timers`, which says how each node
//! reckons a timer's deadline: when it learned of the timer plus the delay the guest asked
//! for); this task only decides *when* to ask for their delivery, and never by a wall clock.
//! A leader whose clock runs ahead cannot end a lease early, nor one whose clock is behind
//! keep it late. Whatever node leads does it, so timers keep firing across leader changes and
//! restarts: a new leader names the timers overdue by its own reckoning at once. Two
//! proposals for the same timers are harmless: a timer is delivered once, as the setting
//! named, and the second entry finds it gone.

use crate::Raft;
use crate::storage::StateHandle;
use crate::types::{Request, now_ms};
use std::time::{Duration, Instant};

/// Longest sleep between two looks. A change of the earliest deadline wakes the task at once;
/// this bounds how long a node that just became leader takes to see overdue timers.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Spawns the task for this node.
pub fn spawn(raft: Raft, state: StateHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut deadline = state.timer_deadline();
        loop {
            let leads = {
                use openraft::async_runtime::WatchReceiver;
                raft.metrics().borrow_watched().state.is_leader()
            };
            let next = *deadline.borrow_and_update();
            let wait = match next.filter(|_| leads) {
                Some(at) if at <= Instant::now() => {
                    let timers = state.due_timers().await;
                    if timers.is_empty() {
                        Duration::from_millis(10)
                    } else {
                        let fire = Request::FireDue {
                            timestamp_ms: now_ms(),
                            timers,
                        };
                        match raft.client_write(fire).await {
                            Ok(_) => continue,
                            Err(e) => {
                                tracing::debug!(error = %e, "could not propose due timers");
                                Duration::from_millis(100)
                            }
                        }
                    }
                }
                Some(at) => at.saturating_duration_since(Instant::now()).min(MAX_WAIT),
                None => MAX_WAIT,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = deadline.changed() => if changed.is_err() { return },
            }
        }
    })
}
