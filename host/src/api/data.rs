//! The data plane, `waft.v1.Waft`: commands (`Submit`, `SubmitBatch`; `Session` is in
//! [`super::session`]), reads (`Query`),
//! `Watch` and the service list; deploys and rollbacks are in [`super::deploy`].

use super::route::write_error;
use super::{Api, convert, forward, trace};
use crate::auth::Role;
use crate::pb::api::{self, waft_server};
use crate::storage::QueryError;
use crate::types::{ClientSeq, Request, now_ms};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use openraft::ReadPolicy;
use openraft::error::{ClientWriteError, RaftError};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

/// A `SubmitBatch` may always carry this many payload bytes (more if single payloads may be
/// larger).
const MIN_BATCH_BYTES: usize = 16 << 20;

impl Api {
    /// The log entry for a Submit, or why it cannot be one.
    #[allow(clippy::result_large_err)]
    fn command(&self, req: api::SubmitRequest) -> Result<Request, Status> {
        self.check_payload(req.payload.len())?;
        if req.service.is_empty() {
            return Err(Status::invalid_argument("a service name is required"));
        }
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
        if n > forward::MAX_COMMANDS {
            return Err(Status::resource_exhausted(format!(
                "a batch of {n} commands is over the limit of {}; split it",
                forward::MAX_COMMANDS
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
                Err(s) => results[i] = Some(forward::to_result(Err(s))),
            }
        }
        let answers = if entries.is_empty() {
            None
        } else {
            Some(
                self.raft
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
                    results[slot] = Some(forward::to_result(answer));
                }
            }
            results.into_iter().flatten().collect()
        }
        .boxed())
    }
}

#[tonic::async_trait]
impl waft_server::Waft for Api {
    async fn submit(
        &self,
        request: GrpcRequest<api::SubmitRequest>,
    ) -> Result<GrpcResponse<api::SubmitReply>, Status> {
        let auth = self.authorize(&request, Role::Client)?;
        let req = request.into_inner();
        let entry = self.command(req.clone())?;
        match self.write(entry, &auth).await? {
            Ok((index, response)) => Ok(GrpcResponse::new(convert::submit_reply(index, response)?)),
            // Joins the follower's batch for the leader (see `forward`).
            Err(leader) => {
                let (reply, served_by) = self
                    .forwarder
                    .submit(self, leader.addr(), &auth, req)
                    .await?;
                let mut reply = GrpcResponse::new(reply);
                if let Some(leader) = served_by {
                    reply.metadata_mut().insert(trace::SERVED_BY, leader);
                }
                Ok(reply)
            }
        }
    }

    async fn submit_batch(
        &self,
        request: GrpcRequest<api::SubmitBatchRequest>,
    ) -> Result<GrpcResponse<api::SubmitBatchReply>, Status> {
        let auth = self.authorize(&request, Role::Client)?;
        let req = request.into_inner();
        self.batch_limits(&req.commands)?;
        if let Some(leader) = self.leader(&auth).await? {
            return leader
                .relay(req, |mut c, r| async move { c.waft.submit_batch(r).await })
                .await;
        }
        let results = self.propose_here(req.commands).await?.await;
        Ok(GrpcResponse::new(api::SubmitBatchReply { results }))
    }

    type SessionStream = super::session::SessionStream;

    async fn session(
        &self,
        request: GrpcRequest<Streaming<api::SessionRequest>>,
    ) -> Result<GrpcResponse<Self::SessionStream>, Status> {
        self.open_session(request)
    }

    async fn query(
        &self,
        request: GrpcRequest<api::QueryRequest>,
    ) -> Result<GrpcResponse<api::QueryReply>, Status> {
        let auth = self.authorize(&request, Role::Client)?;
        let req = request.into_inner();
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
            self.await_leader().await;
        }
        if let Some(policy) = policy
            && let Err(e) = self.raft.ensure_linearizable(policy).await
        {
            return self
                .leader_of(&e, &auth)?
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
                    self.id
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

    async fn deploy(
        &self,
        request: GrpcRequest<Streaming<api::DeployChunk>>,
    ) -> Result<GrpcResponse<api::DeployReply>, Status> {
        self.deploy_upload(request).await
    }

    type WatchStream = super::watch::WatchStream;

    async fn watch(
        &self,
        request: GrpcRequest<api::WatchRequest>,
    ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        self.open_watch(request)
    }

    async fn rollback(
        &self,
        request: GrpcRequest<api::RollbackRequest>,
    ) -> Result<GrpcResponse<api::DeployReply>, Status> {
        self.rollback_to(request).await
    }

    async fn list_services(
        &self,
        request: GrpcRequest<api::ListServicesRequest>,
    ) -> Result<GrpcResponse<api::ListServicesReply>, Status> {
        self.authorize(&request, Role::Client)?;
        let sizes = self.state.service_states().await.unwrap_or_default();
        let memory: std::collections::HashMap<String, (u64, u64)> = self
            .state
            .service_metrics()
            .into_iter()
            .map(|m| (m.name, (m.memory_bytes, m.code_bytes)))
            .collect();
        let services = self
            .state
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
            .collect();
        Ok(GrpcResponse::new(api::ListServicesReply { services }))
    }
}
