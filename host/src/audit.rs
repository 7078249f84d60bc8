//! Divergence detection: replicas prove, periodically, that they hold byte-identical state.
//!
//! The leader proposes an [`Request::Audit`] entry. Applying it, every replica records a digest
//! of its replicated state as of that index (sha256 of each service's guest snapshot, its
//! version and module, and of the exactly-once session table) and the leader gets its own digest
//! back. The leader then proposes that digest in an [`Request::AuditReport`] entry; applying it,
//! every replica that recorded a digest at the same index compares the two. A mismatch is loud:
//! an error in the log, and the divergence in `waft cluster status` (the `audit` field of
//! `Cluster.Status`). Both entries change no state, so audits never alter what replicas compute.
//!
//! Because the comparison travels through the log, it needs no extra RPC, compares exactly the
//! same index on every node, and keeps working across leader changes (a report whose index a
//! replica has no digest of, because it caught up by snapshot, is counted as skipped).

use crate::raft::Raft;
use crate::raft::types::{Request, Response, StateDigest, TypeConfig};
use crate::storage::StateHandle;
use openraft::error::{ClientWriteError, RaftError};
use std::time::Duration;

/// The result of one audit.
#[derive(Debug, Clone)]
pub struct AuditOutcome {
    /// The leader's digest (its `index` is the audit entry's index).
    pub digest: StateDigest,
    /// The index of the report entry; a replica that has applied it has compared.
    pub report_index: u64,
}

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
/// where the leader is).
pub async fn audit_now(raft: &Raft) -> Result<AuditOutcome, AuditError> {
    let written = raft
        .client_write(Request::Audit {
            timestamp_ms: crate::api::now_ms(),
        })
        .await?;
    let Response::Audited(digest) = written.data else {
        return Err(AuditError::Unexpected(format!("{:?}", written.data)));
    };
    let report = raft
        .client_write(Request::AuditReport {
            digest: digest.clone(),
        })
        .await?;
    Ok(AuditOutcome {
        digest,
        report_index: report.log_id.index,
    })
}

/// Audits every `interval` while this node leads and entries were applied since the last
/// audit. Runs until aborted (the node aborts it when it shuts down).
pub fn spawn_auditor(
    raft: Raft,
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
            match audit_now(&raft).await {
                Ok(o) => {
                    tracing::debug!(index = o.digest.index, "state audit proposed");
                    last_report = o.report_index;
                }
                Err(e) => tracing::debug!(error = %e, "state audit did not complete"),
            }
        }
    })
}
