//! Log purging that keeps what a lagging member needs.
//!
//! openraft purges the log up to `--keep-after-snapshot` entries before each new snapshot, and a
//! leader only holds back entries a replication stream is sending at that moment. A member that
//! is being sent a snapshot uses no entries, so they go: by the time it has installed a big
//! snapshot under load, the entries after it are purged, and it needs the next snapshot, and the
//! next. Measured with a 256 MiB state and 64 clients writing (scripts/bench-snapshot-under-load.sh):
//! a new learner installed 13 snapshots in a row and caught up only when the writes stopped.
//!
//! So waft decides (openraft's own policy is off): every node purges up to `keep` entries
//! before its latest snapshot; the leader also keeps every entry after the lowest index a member
//! has acknowledged, so a member that installs the snapshot it is being sent finds the entries
//! after it. A member that lags by more than `max_lag` entries (a node that is down, or gone)
//! stops holding the log back; it gets a newer snapshot when it returns.
//!
//! Purging is local to each node and changes no replicated state.

use crate::Raft;
use openraft::async_runtime::WatchReceiver;
use std::time::Duration;

/// How often each node looks at what it may purge.
const EVERY: Duration = Duration::from_millis(500);

/// What a node keeps in its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgePolicy {
    /// Entries kept before the latest snapshot.
    pub keep: u64,
    /// Most entries before the latest snapshot the leader keeps for members that lag.
    pub max_lag: u64,
}

/// The index up to which (inclusive) a node may purge: `None` when nothing may go.
/// `matched` is the leader's view of each member's acknowledged index (`None` on other nodes).
pub fn purge_upto(
    policy: PurgePolicy,
    snapshot: Option<u64>,
    matched: Option<&[Option<u64>]>,
) -> Option<u64> {
    let snapshot = snapshot?;
    let mut upto = snapshot.checked_sub(policy.keep)?;
    if let Some(matched) = matched {
        let lowest = matched.iter().map(|m| m.unwrap_or(0)).min().unwrap_or(upto);
        let floor = snapshot.saturating_sub(policy.max_lag);
        upto = upto.min(lowest.max(floor));
    }
    (upto > 0).then_some(upto)
}

/// Purges this node's log by `policy` until the task is aborted.
pub fn spawn(raft: Raft, policy: PurgePolicy) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (snapshot, purged, matched) = {
                let m = raft.metrics().borrow_watched().clone();
                let matched: Option<Vec<Option<u64>>> = m
                    .replication
                    .as_ref()
                    .map(|r| r.values().map(|l| l.as_ref().map(|l| l.index)).collect());
                (
                    m.snapshot.map(|s| s.index),
                    m.purged.map(|p| p.index),
                    matched,
                )
            };
            let Some(upto) = purge_upto(policy, snapshot, matched.as_deref()) else {
                continue;
            };
            if purged.is_some_and(|p| p >= upto) {
                continue;
            }
            tracing::debug!(upto, "purging the log");
            if raft.trigger().purge_log(upto).await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PurgePolicy = PurgePolicy {
        keep: 1_000,
        max_lag: 100_000,
    };

    #[test]
    fn a_follower_keeps_entries_before_its_snapshot() {
        assert_eq!(purge_upto(P, None, None), None);
        assert_eq!(purge_upto(P, Some(500), None), None);
        assert_eq!(purge_upto(P, Some(50_000), None), Some(49_000));
    }

    #[test]
    fn the_leader_keeps_what_a_lagging_member_needs_up_to_a_bound() {
        let caught_up = [Some(60_000), Some(60_000), Some(59_990)];
        assert_eq!(purge_upto(P, Some(50_000), Some(&caught_up)), Some(49_000));
        // A member being sent the snapshot acknowledged 20,000 before it.
        let installing = [Some(60_000), Some(60_000), Some(20_000)];
        assert_eq!(purge_upto(P, Some(50_000), Some(&installing)), Some(20_000));
        // A new learner has acknowledged nothing yet.
        let new = [Some(60_000), None];
        assert_eq!(purge_upto(P, Some(50_000), Some(&new)), None);
        // One that lags by more than the bound holds back no more than the bound.
        assert_eq!(
            purge_upto(P, Some(500_000), Some(&installing)),
            Some(400_000)
        );
    }
}
