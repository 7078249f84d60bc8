//! The data handler: commands (`Submit`, `SubmitBatch`; `Session` is in [`super::session`]),
//! reads (`Query`) and the service list.
//!
//! A command takes one way: checked here, then proposed here when this node leads, or sent to
//! the leader by the router (a follower's single `Submit`s in its batches, a `SubmitBatch` or
//! a session's groups as they are). Single and batched commands are proposed alike, in one
//! message to Raft per call or group ([`Data::propose_here`]).

use super::router::{Caller, Router, write_error};
use super::{ApiLimits, MAX_BATCH_COMMANDS, convert, trace};
use crate::pb::api;
use crate::storage::{QueryError, StateHandle};
use crate::types::{ClientSeq, Request, now_ms};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use openraft::ReadPolicy;
use openraft::error::{ClientWriteError, RaftError};
use tonic::{Response as GrpcResponse, Status};

/// A `SubmitBatch` may always carry this many payload bytes (more if single payloads may be
/// larger).
const MIN_BATCH_BYTES: usize = 16 << 20;

/// Commands, reads and the service list of one node.
#[derive(Clone)]
pub struct Data {
    pub(super) router: Router,
    state: StateHandle,
    limits: ApiLimits,
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Data").finish_non_exhaustive()
    }
}

impl Data {
    pub(super) fn new(router: Router, state: StateHandle, limits: ApiLimits) -> Data {
        Data {
            router,
            state,
            limits,
        }
    }

    /// Refuses a payload over the limit.
    #[allow(clippy::result_large_err)]
    fn check_payload(&self, len: usize) -> Result<(), Status> {
        if len > self.limits.max_payload_bytes {
            return Err(Status::resource_exhausted(format!(
                "payload of {len} bytes is over the {}-byte limit",
                self.limits.max_payload_bytes
            )));
        }
        Ok(())
    }

    /// Why a Submit of `req` cannot be a log entry, if it cannot.
    #[allow(clippy::result_large_err)]
    fn check_command(&self, req: &api::SubmitRequest) -> Result<(), Status> {
        self.check_payload(req.payload.len())?;
        if req.service.is_empty() {
            return Err(Status::invalid_argument("a service name is required"));
        }
        Ok(())
    }

    /// The log entry for a Submit, or why it cannot be one.
    #[allow(clippy::result_large_err)]
    fn command(&self, req: api::SubmitRequest) -> Result<Request, Status> {
        self.check_command(&req)?;
        let client = (req.client_id != 0).then_some(ClientSeq {
            client_id: req.client_id,
            seq: req.sequence,
        });
        Ok(Request::Command {
            service: req.service,
            payload: req.payload,
            client,
            timestamp_ms: now_ms(),
        })
    }

    /// Refuses a batch of commands over the limits of one `SubmitBatch`.
    #[allow(clippy::result_large_err)]
    pub(super) fn batch_limits(&self, commands: &[api::SubmitRequest]) -> Result<(), Status> {
        let n = commands.len();
        if n > MAX_BATCH_COMMANDS {
            return Err(Status::resource_exhausted(format!(
                "a batch of {n} commands is over the limit of {MAX_BATCH_COMMANDS}; split it"
            )));
        }
        let bytes: usize = commands.iter().map(|c| c.payload.len()).sum();
        let max_bytes = self.limits.max_payload_bytes.max(MIN_BATCH_BYTES);
        if bytes > max_bytes {
            return Err(Status::resource_exhausted(format!(
                "a batch of {bytes} payload bytes is over the limit of {max_bytes}; split it"
            )));
        }
        Ok(())
    }

    /// Checks each of `commands` as its own Submit would be and proposes the valid ones here,
    /// together and in order, in one message to Raft; the future gives each command's result
    /// (a command that leadership moved away from before it was proposed: UNAVAILABLE).
    pub(super) async fn propose_here(
        &self,
        commands: Vec<api::SubmitRequest>,
    ) -> Result<BoxFuture<'static, Vec<api::SubmitResult>>, Status> {
        let n = commands.len();
        let mut results: Vec<Option<api::SubmitResult>> = vec![None; n];
        let mut entries = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        for (i, c) in commands.into_iter().enumerate() {
            match self.command(c) {
                Ok(entry) => {
                    entries.push(entry);
                    slots.push(i);
                }
                Err(s) => results[i] = Some(convert::to_result(Err(s))),
            }
        }
        let answers = if entries.is_empty() {
            None
        } else {
            Some(
                self.router
                    .raft()
                    .client_write_many(entries)
                    .await
                    .map_err(|e| Status::unavailable(format!("raft stopped: {e}")))?,
            )
        };
        Ok(async move {
            if let Some(mut answers) = answers {
                for slot in slots {
                    let answer = match answers.next().await {
                        Some(Ok(Ok(written))) => {
                            convert::submit_reply(written.log_id.index, written.response)
                        }
                        // Not proposed: leadership moved while the batch waited.
                        Some(Ok(Err(ClientWriteError::ForwardToLeader(_)))) => {
                            Err(Status::unavailable(
                                "this node stopped leading before the command was proposed; retry",
                            ))
                        }
                        Some(Ok(Err(e))) => Err(write_error(&RaftError::APIError(e))),
                        Some(Err(fatal)) => {
                            Err(Status::unavailable(format!("raft stopped: {fatal}")))
                        }
                        None => Err(Status::unavailable("raft stopped; retry")),
                    };
                    results[slot] = Some(convert::to_result(answer));
                }
            }
            results.into_iter().flatten().collect()
        }
        .boxed())
    }

    /// `Waft.Submit`: one command, proposed here when this node leads, else sent to the
    /// leader in this node's next batch for it.
    pub async fn submit(
        &self,
        caller: &Caller,
        req: api::SubmitRequest,
    ) -> Result<GrpcResponse<api::SubmitReply>, Status> {
        self.check_command(&req)?;
        let Some(leader) = self.router.leader(caller).await? else {
            let mut results = self.propose_here(vec![req]).await?.await;
            let result = results.pop().ok_or_else(|| Status::internal("no result"))?;
            return convert::from_result(result).map(GrpcResponse::new);
        };
        let (reply, served_by) = self.router.forward_submit(&leader, caller, req).await?;
        let mut reply = GrpcResponse::new(reply);
        if let Some(leader) = served_by {
            reply.metadata_mut().insert(trace::SERVED_BY, leader);
        }
        Ok(reply)
    }

    /// `Waft.SubmitBatch`: the commands proposed together on the leader.
    pub async fn submit_batch(
        &self,
        caller: &Caller,
        req: api::SubmitBatchRequest,
    ) -> Result<GrpcResponse<api::SubmitBatchReply>, Status> {
        self.batch_limits(&req.commands)?;
        if let Some(leader) = self.router.leader(caller).await? {
            return leader
                .relay(req, |mut c, r| async move { c.waft.submit_batch(r).await })
                .await;
        }
        let results = self.propose_here(req.commands).await?.await;
        Ok(GrpcResponse::new(api::SubmitBatchReply { results }))
    }

    /// `Waft.Query`: a read at the consistency the caller asks for; linearizable and lease
    /// reads are served by the leader.
    pub async fn query(
        &self,
        caller: &Caller,
        req: api::QueryRequest,
    ) -> Result<GrpcResponse<api::QueryReply>, Status> {
        self.check_payload(req.payload.len())?;
        let consistency = api::Consistency::try_from(req.consistency).map_err(|_| {
            Status::invalid_argument(format!("unknown consistency level {}", req.consistency))
        })?;
        let policy = match consistency {
            api::Consistency::Linearizable => Some(ReadPolicy::ReadIndex),
            api::Consistency::Lease => Some(ReadPolicy::LeaseRead),
            api::Consistency::Stale => None,
        };
        if policy.is_some() {
            self.router.await_leader().await;
        }
        if let Some(policy) = policy
            && let Err(e) = self.router.raft().ensure_linearizable(policy).await
        {
            return self
                .router
                .leader_of(&e, caller)?
                .relay(req, |mut c, r| async move { c.waft.query(r).await })
                .await;
        }
        use api::query_reply::Outcome;
        let applied_index = self.state.last_applied().map_or(0, |l| l.index);
        let outcome = match self.state.query(&req.service, req.payload).await {
            Ok(r) => Outcome::Ok(r),
            Err(QueryError::NoSuchService(s)) => {
                return Err(Status::not_found(format!("no service named {s:?}")));
            }
            Err(QueryError::Diverged(why)) => {
                return Err(Status::unavailable(format!(
                    "node {} cannot serve this read: {why}; read from another node",
                    self.router.id()
                )));
            }
            Err(QueryError::Guest(crate::runtime::GuestError::Rejected(m))) => Outcome::Rejected(m),
            Err(QueryError::Guest(e)) => Outcome::Trapped(e.to_string()),
        };
        Ok(GrpcResponse::new(api::QueryReply {
            outcome: Some(outcome),
            applied_index,
        }))
    }

    /// `Waft.ListServices`: what this node runs, as it applied it.
    pub async fn list_services(&self) -> Vec<api::ServiceInfo> {
        let sizes = self.state.service_states().await.unwrap_or_default();
        let memory: std::collections::HashMap<String, (u64, u64)> = self
            .state
            .service_metrics()
            .into_iter()
            .map(|m| (m.name, (m.memory_bytes, m.code_bytes)))
            .collect();
        self.state
            .services()
            .into_iter()
            .map(|s| {
                let state_bytes = sizes.get(&s.name).map_or(0, |b| b.len() as u64);
                let (memory_bytes, code_bytes) = memory.get(&s.name).copied().unwrap_or_default();
                api::ServiceInfo {
                    memory_bytes,
                    code_bytes,
                    ..convert::service_info(s, state_bytes)
                }
            })
            .collect()
    }
}
