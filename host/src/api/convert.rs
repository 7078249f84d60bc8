//! Mapping between the state machine's and Raft's values and the API's messages.

use crate::pb::api;
use crate::types::{NodeId, Response, TypeConfig};
use std::collections::BTreeSet;
use tonic::Status;

pub(super) fn members(m: &openraft::RaftMetrics<TypeConfig>) -> Vec<api::MemberStatus> {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let last = m.last_log_index.unwrap_or(0);
    membership
        .nodes()
        .map(|(id, node)| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id))
                .map(|l| l.as_ref().map_or(0, |l| l.index));
            api::MemberStatus {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched,
                lag: matched.map(|x| last.saturating_sub(x)),
                version: String::new(),
                runs_oldest: 0,
                runs_newest: 0,
            }
        })
        .collect()
}

pub(super) fn audit_status(a: &crate::storage::AuditStatus) -> api::AuditStatus {
    api::AuditStatus {
        checks: a.checks,
        skipped: a.skipped,
        last_checked_index: a.last_checked_index,
        divergences: a
            .divergences
            .iter()
            .map(|d| api::Divergence {
                index: d.index,
                what: d.what.clone(),
                local: d.local.clone(),
                expected: d.expected.clone(),
                majority: d.majority,
            })
            .collect(),
        heals: a
            .heals
            .iter()
            .map(|h| api::Heal {
                audit_index: h.audit_index,
                at_index: h.at_index,
                items: h.items.clone(),
                source: h.source,
                error: h.error.clone().unwrap_or_default(),
            })
            .collect(),
        unavailable: a
            .unavailable
            .iter()
            .map(|(service, reason)| api::UnavailableService {
                service: service.clone(),
                reason: reason.clone(),
            })
            .collect(),
    }
}

/// A command's outcome as the reply to its `Submit`.
pub(super) fn submit_reply(index: u64, response: Response) -> Result<api::SubmitReply, Status> {
    use api::submit_reply::Outcome;
    let outcome = match response {
        Response::Reply(r) => Outcome::Ok(r),
        Response::Rejected(m) => Outcome::Rejected(m),
        Response::Trapped(m) => Outcome::Trapped(m),
        Response::NoSuchService(s) => {
            return Err(Status::not_found(format!(
                "no service named {s:?}; deploy one first"
            )));
        }
        other => {
            return Err(Status::internal(format!(
                "unexpected response to a command: {other:?}"
            )));
        }
    };
    Ok(api::SubmitReply {
        outcome: Some(outcome),
        index,
    })
}

/// An applied command or version change as a `Watch` event.
pub(super) fn watch_event(e: &crate::storage::events::Event) -> api::WatchEvent {
    use crate::storage::events::Outcome;
    use api::watch_event::Outcome as Pb;
    api::WatchEvent {
        index: e.index,
        service: e.service.to_string(),
        timestamp_ms: e.timestamp_ms,
        payload: e.payload.clone(),
        outcome: Some(match &e.outcome {
            Outcome::Reply(r) => Pb::Reply(r.clone()),
            Outcome::Rejected(m) => Pb::Rejected(m.clone()),
            Outcome::Failed(m) => Pb::Failed(m.clone()),
            Outcome::Version(v) => Pb::Version(*v),
            Outcome::Emitted(topic) => Pb::Emitted(topic.clone()),
            Outcome::Fired(key) => Pb::Fired(key.clone()),
        }),
    }
}

/// What a dry run found, for the deploy's reply.
pub(super) fn trial_report(t: crate::trial::Trial) -> api::TrialReport {
    api::TrialReport {
        source: t.source,
        commands: t.commands,
        differing: t.differing,
        first: t
            .first
            .into_iter()
            .map(|d| api::ReplyDifference {
                at: d.at,
                command: d.command,
                running: d.running,
                new: d.new,
            })
            .collect(),
        from_index: t.from_index,
        to_index: t.to_index,
    }
}

/// A service as `ListServices` describes it.
pub(super) fn service_info(s: crate::storage::ServiceInfo, state_bytes: u64) -> api::ServiceInfo {
    api::ServiceInfo {
        state_bytes,
        // Observations of the answering node; the caller fills them in.
        memory_bytes: 0,
        code_bytes: 0,
        module_sha256: s.module.hash.to_hex(),
        module_size: s.module.size as u64,
        fsm_version: s.module.fsm.number().to_owned(),
        pending_timers: s.pending_timers as u64,
        next_timer_ms: s.next_timer_ms.unwrap_or(0),
        deployed_at_index: s.deployed_at,
        version: s.version,
        fuel_per_apply: s
            .history
            .last()
            .and_then(|v| v.limits.fuel_per_apply)
            .unwrap_or(0),
        max_memory_bytes: s
            .history
            .last()
            .and_then(|v| v.limits.max_memory_bytes)
            .unwrap_or(0),
        history: s
            .history
            .iter()
            .map(|r| api::VersionInfo {
                version: r.version,
                module_sha256: r.module.clone(),
                deployed_at_index: r.deployed_at,
                forced: r.forced.clone().unwrap_or_default(),
            })
            .collect(),
        name: s.name,
    }
}

/// A command's result as its own Submit would have answered.
pub(super) fn from_result(result: api::SubmitResult) -> Result<api::SubmitReply, Status> {
    match result.result {
        Some(api::submit_result::Result::Reply(r)) => Ok(r),
        Some(api::submit_result::Result::Failure(f)) => {
            Err(Status::new(tonic::Code::from(f.code), f.message))
        }
        None => Err(Status::internal("the leader sent an empty result")),
    }
}

/// The result that stands for `answer` in a batch reply.
pub(super) fn to_result(answer: Result<api::SubmitReply, Status>) -> api::SubmitResult {
    use api::submit_result::Result as R;
    api::SubmitResult {
        result: Some(match answer {
            Ok(reply) => R::Reply(reply),
            Err(s) => R::Failure(api::Failure {
                code: s.code() as i32,
                message: s.message().to_owned(),
            }),
        }),
    }
}
