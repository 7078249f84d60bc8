//! The replica side of state audits: digests, and the verdict on each audit's votes.
//!
//! At an [`Request::Audit`](crate::types::Request::Audit) entry every replica records a
//! digest of its replicated state. The leader then collects every member's digest and proposes
//! them in an `AuditVotes` entry. Applying it, each replica compares its own digest with the
//! value a majority of voters reported, item by item (each service, and the session table):
//!
//! - it agrees: nothing to do; if some member disagrees, it keeps what that member needs to
//!   rebuild the item (see [`super::heal`]);
//! - it disagrees with a majority: a divergence; the item is healed from a majority replica;
//! - no value has a majority: a divergence is reported against the proposer's value, and
//!   nothing changes (report only).
//!
//! Everything here is a local observation: never replicated, never in snapshots.

use super::SmState;
use crate::storage::snapshot::Session;
use crate::types::{NodeId, ServiceDigest, StateDigest};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;

/// Digests kept for comparison with a later report (a report arrives one entry after its
/// audit unless leadership changes in between).
const KEPT_DIGESTS: usize = 16;
/// Divergences and heals kept for status.
const KEPT_RECORDS: usize = 16;

#[derive(Debug, Default)]
pub(super) struct Audit {
    pub(super) digests: VecDeque<StateDigest>,
    pub(super) status: AuditStatus,
}

/// What this replica learned from state audits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditStatus {
    /// Audits compared with a digest of our own.
    pub checks: u64,
    /// Audits for an index this replica has no digest of (it got there by a snapshot, or
    /// restarted in between): nothing to compare.
    pub skipped: u64,
    /// The audit index of the last comparison.
    pub last_checked_index: Option<u64>,
    /// Every mismatch seen (the most recent 16), oldest first.
    pub divergences: Vec<Divergence>,
    /// Every heal of this replica (the most recent 16), oldest first.
    pub heals: Vec<HealRecord>,
    /// Divergences found since the node started.
    pub divergences_total: u64,
    /// Heals completed since the node started.
    pub heals_total: u64,
    /// Heals that failed since the node started.
    pub heal_failures_total: u64,
    /// Services this replica refuses to read from, with the reason: it diverged and has not
    /// been rebuilt yet (a heal in progress, or one that failed; the next audit retries).
    pub unavailable: BTreeMap<String, String>,
}

/// One mismatch between this replica's state and the majority's at the same index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The audit index.
    pub index: u64,
    /// What differs: `service NAME`, or `sessions`.
    pub what: String,
    /// This replica's value.
    pub local: String,
    /// The value a majority of voters reported; or, when no value has a majority, the
    /// proposer's (see `majority`).
    pub expected: String,
    /// Whether `expected` is a majority's value (then the item is healed); false: report only.
    pub majority: bool,
}

/// What a diverged replica must rebuild, decided by applying an `AuditVotes` entry.
#[derive(Debug, Clone)]
pub struct HealPlan {
    /// The audit index the divergence was found at.
    pub audit_index: u64,
    /// The votes entry's index: the state is rebuilt as of this entry.
    pub at_index: u64,
    pub(super) items: Vec<Item>,
    /// Majority replicas, with their addresses, in the order to ask them.
    pub sources: Vec<(NodeId, String)>,
}

/// One rebuild of diverged items from a majority replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealRecord {
    /// The audit index the divergence was found at.
    pub audit_index: u64,
    /// The index of the votes entry: the state was rebuilt as of this entry.
    pub at_index: u64,
    /// What was rebuilt: `service NAME` or `sessions`.
    pub items: Vec<String>,
    /// The replica the state came from (`None` if none could give it).
    pub source: Option<NodeId>,
    /// `None`: healed. Otherwise why it failed (the items stay unavailable until the next
    /// audit heals them).
    pub error: Option<String>,
}

/// A replica's answer to the leader collecting audit votes (node-to-node `Digest` RPC).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum DigestReply {
    /// Not applied the audit entry yet (applied up to `applied`).
    NotYet {
        /// Its last applied index.
        applied: u64,
    },
    /// Its digest at that index.
    Ready(StateDigest),
    /// It has no digest at that index (caught up by snapshot, restarted, or too long ago).
    Gone,
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn describe(d: Option<&ServiceDigest>) -> String {
    match d {
        None => "absent".to_owned(),
        Some(d) => format!(
            "version {} module {} state {} ({} bytes)",
            d.version,
            &d.module[..d.module.len().min(12)],
            d.state,
            d.state_len
        ),
    }
}

/// One item of a digest: a service (by name) or the session table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Item {
    Service(String),
    Sessions,
}

impl Item {
    pub(super) fn label(&self) -> String {
        match self {
            Item::Service(name) => format!("service {name}"),
            Item::Sessions => "sessions".to_owned(),
        }
    }

    /// This item's value in a digest, as text (absent services included).
    fn value(&self, d: &StateDigest) -> String {
        match self {
            Item::Service(name) => describe(d.services.iter().find(|s| &s.name == name)),
            Item::Sessions => d.sessions.clone(),
        }
    }
}

/// The outcome for one item of one audit, as this replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ItemVerdict {
    pub(super) item: Item,
    /// The majority's value and the voters that reported it; `None`: no value has a majority.
    pub(super) majority: Option<(String, Vec<NodeId>)>,
    /// Whether this replica's value differs from the reference (the majority's, or the
    /// proposer's when there is none).
    pub(super) ours_differs: bool,
    /// The reference value.
    pub(super) expected: String,
    /// Whether some member reported a value other than the majority's.
    pub(super) dissent: bool,
}

/// Judges one audit: every item in any digest, compared as described in the module docs.
/// `voters` are the voters of the membership in effect; only their votes count towards a
/// majority (of all voters, whether or not they answered).
pub(super) fn judge(
    ours: &StateDigest,
    votes: &[(NodeId, StateDigest)],
    voters: &BTreeSet<NodeId>,
    proposer: NodeId,
) -> Vec<ItemVerdict> {
    let mut items: BTreeSet<Item> = BTreeSet::new();
    for d in votes.iter().map(|(_, d)| d).chain([ours]) {
        items.extend(d.services.iter().map(|s| Item::Service(s.name.clone())));
    }
    items.insert(Item::Sessions);
    let quorum = voters.len() / 2 + 1;
    let mut out = Vec::new();
    for item in items {
        let mut groups: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
        for (node, d) in votes {
            if voters.contains(node) {
                groups.entry(item.value(d)).or_default().push(*node);
            }
        }
        let majority = groups.into_iter().find(|(_, nodes)| nodes.len() >= quorum);
        let mine = item.value(ours);
        let expected = match &majority {
            Some((value, _)) => value.clone(),
            None => votes
                .iter()
                .find(|(n, _)| *n == proposer)
                .map_or_else(|| mine.clone(), |(_, d)| item.value(d)),
        };
        let dissent = majority
            .as_ref()
            .is_some_and(|(value, _)| votes.iter().any(|(_, d)| &item.value(d) != value));
        out.push(ItemVerdict {
            ours_differs: mine != expected,
            item,
            majority,
            expected,
            dissent,
        });
    }
    out
}

impl SmState {
    /// A digest of the replicated state as of entry `index`.
    pub(super) fn digest(&mut self, index: u64) -> io::Result<StateDigest> {
        let mut services = Vec::with_capacity(self.rep.services.len());
        for (name, svc) in &mut self.rep.services {
            let (mut state, state_len) = match svc.guest.snapshot() {
                Ok(bytes) => (sha256_hex(&bytes), bytes.len() as u64),
                Err(e) => (format!("snapshot failed: {e}"), 0),
            };
            // Pending timers are the service's state too (the digest of a service without any
            // reads as it did before timers existed).
            if !svc.timers.is_empty() {
                state = format!("{state} timers:{}", svc.timers.digest());
            }
            services.push(ServiceDigest {
                name: name.clone(),
                version: svc.history.last().map_or(0, |r| r.version),
                module: svc.module.hash().to_hex(),
                state,
                state_len,
            });
        }
        Ok(StateDigest {
            index,
            services,
            sessions: sessions_digest(&self.rep.sessions)?,
        })
    }

    /// Records our digest at an audit entry.
    pub(super) fn record_digest(&mut self, index: u64) -> io::Result<StateDigest> {
        let digest = self.digest(index)?;
        let digests = &mut self.local.audit.digests;
        if digests.len() == KEPT_DIGESTS {
            digests.pop_front();
        }
        digests.push_back(digest.clone());
        Ok(digest)
    }

    /// Our digest at an audit index, if we recorded one.
    pub(super) fn digest_at(&self, index: u64) -> Option<&StateDigest> {
        self.local.audit.digests.iter().find(|d| d.index == index)
    }

    fn note_divergence(&mut self, d: Divergence) {
        let verdict = if d.majority {
            "STATE DIVERGENCE: this replica's state differs from a majority of voters' at the same log index; rebuilding it from a majority replica"
        } else {
            "STATE DIVERGENCE: this replica's state differs from the leader's at the same log index, and no value has a majority: reported only, nothing changes"
        };
        tracing::error!(
            index = d.index,
            what = %d.what,
            local = %d.local,
            expected = %d.expected,
            "{verdict}"
        );
        self.local.audit.status.divergences_total += 1;
        let list = &mut self.local.audit.status.divergences;
        if list.len() == KEPT_RECORDS {
            list.remove(0);
        }
        list.push(d);
    }

    pub(super) fn note_heal(&mut self, record: HealRecord) {
        let status = &mut self.local.audit.status;
        if record.error.is_none() {
            status.heals_total += 1;
        } else {
            status.heal_failures_total += 1;
        }
        let list = &mut self.local.audit.status.heals;
        if list.len() == KEPT_RECORDS {
            list.remove(0);
        }
        list.push(record);
    }

    /// Applies an old-style report (the leader's digest only): compare and report.
    pub(super) fn check_report(&mut self, leader: &StateDigest) {
        let Some(ours) = self.digest_at(leader.index).cloned() else {
            self.local.audit.status.skipped += 1;
            return;
        };
        let leader_id = 0;
        let verdicts = judge(
            &ours,
            &[(leader_id, leader.clone())],
            &BTreeSet::new(),
            leader_id,
        );
        self.local.audit.status.checks += 1;
        self.local.audit.status.last_checked_index = Some(leader.index);
        for v in verdicts.into_iter().filter(|v| v.ours_differs) {
            self.note_divergence(Divergence {
                index: leader.index,
                what: v.item.label(),
                local: v.item.value(&ours),
                expected: v.expected,
                majority: false,
            });
        }
    }

    /// Applies an `AuditVotes` entry at `at_index`: judges each item, records divergences,
    /// keeps what dissenting members need, and returns the heal this replica needs, if any.
    pub(super) fn check_votes(
        &mut self,
        at_index: u64,
        index: u64,
        proposer: NodeId,
        votes: &[(NodeId, StateDigest)],
    ) -> Option<HealPlan> {
        let Some(ours) = self.digest_at(index).cloned() else {
            self.local.audit.status.skipped += 1;
            return None;
        };
        let voters: BTreeSet<NodeId> = self.rep.membership.membership().voter_ids().collect();
        let verdicts = judge(&ours, votes, &voters, proposer);
        self.local.audit.status.checks += 1;
        self.local.audit.status.last_checked_index = Some(index);
        let mut heal: Vec<Item> = Vec::new();
        let mut give: Vec<Item> = Vec::new();
        let mut sources: Vec<NodeId> = Vec::new();
        for v in verdicts {
            if v.ours_differs {
                self.note_divergence(Divergence {
                    index,
                    what: v.item.label(),
                    local: v.item.value(&ours),
                    expected: v.expected.clone(),
                    majority: v.majority.is_some(),
                });
                if let Some((_, nodes)) = &v.majority {
                    if let Item::Service(name) = &v.item {
                        self.local.audit.status.unavailable.insert(
                            name.clone(),
                            format!(
                                "service {name} on this node diverged at audit index {index} (its state \
                                 {} where a majority of voters have {}); it is being rebuilt from a \
                                 majority replica",
                                v.item.value(&ours),
                                v.expected
                            ),
                        );
                    }
                    for n in nodes {
                        if !sources.contains(n) {
                            sources.push(*n);
                        }
                    }
                    heal.push(v.item);
                }
            } else if v.dissent {
                give.push(v.item);
            }
        }
        if !give.is_empty() {
            self.keep_heal_source(at_index, &give);
        }
        if heal.is_empty() {
            return None;
        }
        let addrs: Vec<(NodeId, String)> = sources
            .into_iter()
            .filter_map(|n| {
                self.rep
                    .membership
                    .membership()
                    .get_node(&n)
                    .map(|node| (n, node.addr.clone()))
            })
            .collect();
        Some(HealPlan {
            audit_index: index,
            at_index,
            items: heal,
            sources: addrs,
        })
    }
}

/// sha256 (hex) of the session table's encoding.
pub(super) fn sessions_digest(sessions: &BTreeMap<u64, Session>) -> io::Result<String> {
    let list: Vec<(&u64, &Session)> = sessions.iter().collect();
    Ok(sha256_hex(&crate::storage::codec::encode(&list)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(state: &str) -> StateDigest {
        StateDigest {
            index: 7,
            services: vec![ServiceDigest {
                name: "kv".into(),
                version: 1,
                module: "m".into(),
                state: state.into(),
                state_len: 1,
            }],
            sessions: "s".into(),
        }
    }

    fn kv(verdicts: &[ItemVerdict]) -> &ItemVerdict {
        verdicts
            .iter()
            .find(|v| v.item == Item::Service("kv".into()))
            .expect("kv judged")
    }

    #[test]
    fn a_replica_in_the_minority_differs_from_the_majority_and_others_see_dissent() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let votes = vec![(1, digest("a")), (2, digest("a")), (3, digest("b"))];
        let bad = judge(&digest("b"), &votes, &voters, 1);
        let v = kv(&bad);
        assert!(v.ours_differs);
        assert_eq!(
            v.majority.as_ref().map(|(_, n)| n.clone()),
            Some(vec![1, 2])
        );
        let good = judge(&digest("a"), &votes, &voters, 3);
        assert!(!kv(&good).ours_differs);
        assert!(kv(&good).dissent);
        let sessions = good
            .iter()
            .find(|v| v.item == Item::Sessions)
            .expect("sessions");
        assert!(!sessions.dissent && !sessions.ours_differs);
    }

    #[test]
    fn without_a_majority_the_proposers_value_is_the_reference_and_nothing_heals() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        // Three different values, or one vote of three voters: no majority.
        let votes = vec![(1, digest("a")), (2, digest("b")), (3, digest("c"))];
        let v = judge(&digest("b"), &votes, &voters, 1);
        assert!(kv(&v).majority.is_none() && kv(&v).ours_differs);
        let v = judge(&digest("b"), &[(1, digest("a"))], &voters, 1);
        assert!(kv(&v).majority.is_none() && kv(&v).ours_differs && !kv(&v).dissent);
        // Learners' votes do not count towards a majority.
        let votes = vec![(1, digest("a")), (4, digest("a")), (5, digest("a"))];
        assert!(
            kv(&judge(&digest("a"), &votes, &voters, 1))
                .majority
                .is_none()
        );
    }

    #[test]
    fn a_service_missing_on_one_replica_is_an_item_too() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let mut empty = digest("a");
        empty.services.clear();
        let votes = vec![(1, digest("a")), (2, digest("a")), (3, empty.clone())];
        let v = judge(&empty, &votes, &voters, 1);
        assert!(kv(&v).ours_differs && kv(&v).majority.is_some());
    }
}
