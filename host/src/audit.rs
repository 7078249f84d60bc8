//! Divergence detection and healing: replicas prove, periodically, that they hold
//! byte-identical state, and a replica that does not is rebuilt from the majority.
//!
//! The leader proposes a [`Request::Audit`] entry. Applying it, every replica records a digest
//! of its replicated state as of that index (sha256 of each service's guest snapshot, its
//! version and module, and of the exactly-once session table) and the leader gets its own digest
//! back. The leader then asks every member for its digest at that index (the node-to-node
//! `Digest` RPC) and proposes them all in a [`Request::AuditVotes`] entry. Applying it, every
//! replica that recorded a digest at the same index compares its own with the value a majority
//! of voters reported, item by item. A replica in the minority for a service stops serving reads
//! of it (UNAVAILABLE, naming the divergence) and rebuilds it from a majority replica before it
//! applies the next entry; a leader in the minority first hands leadership to a majority
//! replica. Without a majority for a value, the divergence is reported against the leader's
//! value and nothing changes. Every step is in the log (errors and warnings), in metrics and in
//! `waft cluster status` (the `audit` field of `Cluster.Status`). See
//! `crate::storage::state_machine::audit` and `heal` for the replica side.
//!
//! Because the verdict travels through the log, every replica judges the same votes at the same
//! index, and audits keep working across leader changes (a report whose index a replica has no
//! digest of, because it caught up by snapshot, is counted as skipped).

use crate::Raft;
use crate::raft::NetworkFactory;
use crate::storage::{DigestReply, StateHandle};
use crate::types::{NodeId, Request, Response, StateDigest, TypeConfig};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use std::time::Duration;

/// The result of one audit.
#[derive(Debug, Clone)]
pub struct AuditOutcome {
    /// The leader's digest (its `index` is the audit entry's index).
    pub digest: StateDigest,
    /// The index of the votes entry; a replica that has applied it has compared (and healed,
    /// if it had to).
    pub report_index: u64,
    /// Every member's digest that was collected, the leader's included.
    pub votes: Vec<(NodeId, StateDigest)>,
    /// Members whose digest could not be collected, and why.
    pub missing: Vec<(NodeId, String)>,
}

/// How long the leader waits for a member to apply the audit entry and answer.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an audit could not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Writing an audit entry failed (not the leader, leadership moved, Raft stopped).
    #[error(transparent)]
    Raft(#[from] RaftError<TypeConfig, ClientWriteError<TypeConfig>>),
    /// The audit entry was answered with something other than a digest (a bug).
    #[error("an audit entry was answered with {0}")]
    Unexpected(String),
}

/// Runs one audit through this node's Raft (it must be the leader; otherwise the error says
/// where the leader is), collecting the members' digests through `net`.
pub async fn audit_now(raft: &Raft, net: &NetworkFactory) -> Result<AuditOutcome, AuditError> {
    let written = raft
        .client_write(Request::Audit {
            timestamp_ms: crate::types::now_ms(),
        })
        .await?;
    let Response::Audited(digest) = written.data else {
        return Err(AuditError::Unexpected(format!("{:?}", written.data)));
    };
    let me = *raft.node_id();
    let members: Vec<(NodeId, String)> = raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .nodes()
        .filter(|(id, _)| **id != me)
        .map(|(id, node)| (*id, node.addr.clone()))
        .collect();
    let index = digest.index;
    let collected = futures::future::join_all(members.into_iter().map(
        |(id, addr): (NodeId, String)| async move {
            let got = collect(net, id, &addr, index).await;
            (id, got)
        },
    ))
    .await;
    let mut votes = vec![(me, digest.clone())];
    let mut missing = Vec::new();
    for (id, result) in collected {
        match result {
            Ok(d) => votes.push((id, d)),
            Err(why) => {
                tracing::debug!(node = id, index, %why, "no audit digest from a member");
                missing.push((id, why));
            }
        }
    }
    let report = raft
        .client_write(Request::AuditVotes {
            index,
            proposer: me,
            votes: votes.clone(),
        })
        .await?;
    Ok(AuditOutcome {
        digest,
        report_index: report.log_id.index,
        votes,
        missing,
    })
}

/// One member's digest at `index`, waiting (briefly) for it to apply the audit entry.
async fn collect(
    net: &NetworkFactory,
    id: NodeId,
    addr: &str,
    index: u64,
) -> Result<StateDigest, String> {
    let deadline = tokio::time::Instant::now() + COLLECT_TIMEOUT;
    loop {
        let why = match crate::raft::peer_audit::fetch_digest(net, id, addr, index).await {
            Ok(DigestReply::Ready(d)) => return Ok(d),
            Ok(DigestReply::Gone) => return Err("it holds no digest at that index".to_owned()),
            Ok(DigestReply::NotYet { applied }) => format!("it has applied up to {applied}"),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(why);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Audits every `interval` while this node leads and entries were applied since the last
/// audit. Runs until aborted (the node aborts it when it shuts down).
pub fn spawn_auditor(
    raft: Raft,
    net: NetworkFactory,
    state: StateHandle,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_report = 0u64;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let applied = state.last_applied().map_or(0, |l| l.index);
            let leads = raft
                .current_leader()
                .await
                .is_some_and(|l| l == *raft.node_id());
            if !leads || applied <= last_report {
                continue;
            }
            match audit_now(&raft, &net).await {
                Ok(o) => {
                    tracing::debug!(index = o.digest.index, "state audit proposed");
                    last_report = o.report_index;
                }
                Err(e) => tracing::debug!(error = %e, "state audit did not complete"),
            }
        }
    })
}
