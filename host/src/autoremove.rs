//! Opt-in removal of voters that stay unreachable (`waft node --remove-unreachable-after`).
//!
//! A voter that is gone for good (its machine died, its pod was deleted) still counts towards
//! the quorum: a 3-node cluster with one dead voter survives no further failure. With this policy
//! the leader removes such a voter once it has not acknowledged anything for longer than the
//! configured time, so the remaining nodes again tolerate a failure (5 → 4 → 3 voters...).
//!
//! The policy never shrinks the voter set below `min_voters` (default 3: a cluster that could
//! survive one failure keeps that property by staying at three voters until a person decides),
//! removes one voter at a time, and only acts while the leader hears from a majority of the
//! current voters (a leader cut off from the others must not try to reconfigure). A removed node
//! that comes back is no longer a member; it rejoins with `waft node --join` like a new one.
//!
//! Everything here is the leader's local observation of time; what reaches the log is an ordinary
//! membership change, so replicas stay identical.

use crate::Raft;
use crate::types::{NodeId, TypeConfig};
use openraft::ChangeMembers;
use std::collections::BTreeSet;
use std::time::Duration;

/// When the leader removes unreachable voters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovalPolicy {
    /// A voter that acknowledged nothing for longer than this is removed.
    pub after: Duration,
    /// Never remove a voter when fewer than this many would remain.
    pub min_voters: usize,
}

impl RemovalPolicy {
    /// The policy with the default floor of three voters.
    pub fn after(after: Duration) -> RemovalPolicy {
        RemovalPolicy {
            after,
            min_voters: 3,
        }
    }
}

/// What the policy decides from one look at the leader's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do.
    Keep,
    /// Remove this voter (unreachable for this long).
    Remove(NodeId, Duration),
    /// These voters are unreachable for too long, but removing one would go below the floor or
    /// the leader does not hear from a majority.
    Blocked(Vec<NodeId>, &'static str),
}

/// Decides from the leader's view: for each voter, how long since it last acknowledged the
/// leader (`None`: never, since `leading_for`).
pub fn decide(
    policy: &RemovalPolicy,
    leader: NodeId,
    voters: &BTreeSet<NodeId>,
    silent_for: impl Fn(NodeId) -> Option<Duration>,
    leading_for: Duration,
) -> Decision {
    let silence = |v: NodeId| silent_for(v).unwrap_or(leading_for);
    let others = voters.iter().copied().filter(|v| *v != leader);
    let mut overdue: Vec<(Duration, NodeId)> = others
        .clone()
        .map(|v| (silence(v), v))
        .filter(|(s, _)| *s > policy.after)
        .collect();
    if overdue.is_empty() {
        return Decision::Keep;
    }
    // The longest silent first; ties by id, so the choice does not depend on map order.
    overdue.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let ids = overdue.iter().map(|(_, v)| *v).collect::<Vec<_>>();
    // Who answered within the policy's time, counting the leader itself.
    let reachable = 1 + others.filter(|v| silence(*v) <= policy.after).count();
    if reachable * 2 <= voters.len() {
        return Decision::Blocked(
            ids,
            "the leader does not hear from a majority of the voters",
        );
    }
    if voters.len() - 1 < policy.min_voters.max(1) {
        return Decision::Blocked(ids, "removing one would leave fewer voters than the floor");
    }
    let (silent, id) = overdue[0];
    Decision::Remove(id, silent)
}

/// Applies `policy` while this node leads, checking a few times per `policy.after`. Runs until
/// aborted (the node aborts it when it shuts down).
pub fn spawn(raft: Raft, policy: RemovalPolicy) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let me = *raft.node_id();
        let every = (policy.after / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // (term, when this node was first seen leading in it)
        let mut leading: Option<(u64, tokio::time::Instant)> = None;
        let mut reported: Vec<NodeId> = Vec::new();
        loop {
            tick.tick().await;
            let m: openraft::RaftMetrics<TypeConfig> = {
                use openraft::async_runtime::WatchReceiver;
                raft.metrics().borrow_watched().clone()
            };
            if !m.state.is_leader() {
                leading = None;
                continue;
            }
            let since = match leading {
                Some((term, at)) if term == m.current_term => at,
                _ => {
                    let now = tokio::time::Instant::now();
                    leading = Some((m.current_term, now));
                    now
                }
            };
            let membership = m.membership_config.membership();
            if membership.get_joint_config().len() > 1 {
                continue; // a membership change is under way; look again once it is done
            }
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let silent_for = |id: NodeId| {
                m.heartbeat
                    .as_ref()
                    .and_then(|h| h.get(&id))
                    .and_then(|t| t.as_ref())
                    .map(|t| openraft::Instant::elapsed(&**t))
            };
            match decide(&policy, me, &voters, silent_for, since.elapsed()) {
                Decision::Keep => reported.clear(),
                Decision::Blocked(ids, why) => {
                    if ids != reported {
                        tracing::warn!(
                            voters = ?ids,
                            after = ?policy.after,
                            min_voters = policy.min_voters,
                            "voters unreachable for too long are kept: {why}"
                        );
                        reported = ids;
                    }
                }
                Decision::Remove(id, silent) => {
                    tracing::warn!(
                        node = id,
                        silent_ms = silent.as_millis() as u64,
                        "removing a voter that has been unreachable for longer than {:?}",
                        policy.after
                    );
                    let change = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
                    let done = tokio::time::timeout(
                        policy.after.max(Duration::from_secs(5)),
                        raft.change_membership(change, false),
                    )
                    .await;
                    match done {
                        Ok(Ok(r)) => tracing::warn!(
                            node = id,
                            index = r.log_id.index,
                            "removed unreachable voter"
                        ),
                        Ok(Err(e)) => {
                            tracing::info!(node = id, error = %e, "removing a voter failed")
                        }
                        Err(_) => tracing::info!(node = id, "removing a voter timed out"),
                    }
                    reported.clear();
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn run(policy: RemovalPolicy, voters: &[NodeId], silent: &[(NodeId, u64)]) -> Decision {
        let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
        let silent_for = |id: NodeId| silent.iter().find(|(v, _)| *v == id).map(|(_, s)| secs(*s));
        decide(&policy, 1, &voters, silent_for, secs(1000))
    }

    #[test]
    fn removes_the_longest_silent_voter_first() {
        let p = RemovalPolicy::after(secs(10));
        let d = run(p, &[1, 2, 3, 4, 5], &[(2, 0), (3, 11), (4, 30), (5, 0)]);
        assert_eq!(d, Decision::Remove(4, secs(30)));
    }

    #[test]
    fn keeps_voters_that_answered_in_time() {
        let p = RemovalPolicy::after(secs(10));
        assert_eq!(
            run(p, &[1, 2, 3, 4], &[(2, 0), (3, 9), (4, 10)]),
            Decision::Keep
        );
    }

    #[test]
    fn a_voter_never_heard_from_counts_from_the_start_of_leadership() {
        let p = RemovalPolicy::after(secs(10));
        let voters: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        let silent_for = |id: NodeId| (id != 4).then(|| secs(0));
        assert_eq!(decide(&p, 1, &voters, silent_for, secs(5)), Decision::Keep);
        assert_eq!(
            decide(&p, 1, &voters, silent_for, secs(11)),
            Decision::Remove(4, secs(11))
        );
    }

    #[test]
    fn never_goes_below_the_floor() {
        let p = RemovalPolicy::after(secs(10));
        assert!(matches!(
            run(p, &[1, 2, 3], &[(2, 0), (3, 60)]),
            Decision::Blocked(ids, _) if ids == vec![3]
        ));
        let low = RemovalPolicy { min_voters: 2, ..p };
        assert_eq!(
            run(low, &[1, 2, 3], &[(2, 0), (3, 60)]),
            Decision::Remove(3, secs(60))
        );
    }

    #[test]
    fn a_leader_without_a_majority_removes_nobody() {
        let p = RemovalPolicy {
            min_voters: 1,
            ..RemovalPolicy::after(secs(10))
        };
        // 5 voters, the leader hears from one other: 2 of 5 is not a majority.
        assert!(matches!(
            run(p, &[1, 2, 3, 4, 5], &[(2, 0), (3, 60), (4, 60), (5, 60)]),
            Decision::Blocked(..)
        ));
        // 4 voters, 2 reachable: not a majority either.
        assert!(matches!(
            run(p, &[1, 2, 3, 4], &[(2, 0), (3, 60), (4, 60)]),
            Decision::Blocked(..)
        ));
        // 5 voters, 3 reachable: removes.
        assert_eq!(
            run(p, &[1, 2, 3, 4, 5], &[(2, 0), (3, 0), (4, 60), (5, 20)]),
            Decision::Remove(4, secs(60))
        );
    }
}
