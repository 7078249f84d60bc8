//! The client API (`proto/api.proto`, package `waft.v1`): any node accepts any call.
//!
//! Writes, deploys, linearizable and lease reads and membership changes need the leader. A node
//! that is not the leader forwards the call to it over a reused channel, unchanged (a command
//! keeps its client id and sequence, so a retry after a leader change is still applied once).
//! A forwarded call carries the `waft-forwarded` header and is never forwarded again: if the
//! leadership moved in between, the client gets `UNAVAILABLE` and retries. It also carries the
//! caller's request id, so the call's tracing spans on both nodes share it (see [`trace`]).

pub(crate) mod forward;
pub mod trace;

use crate::pb::api::{self, cluster_server, waft_server};
use crate::types::{ClientSeq, Node as RaftNode, NodeId, Request, Response, now_ms};
use crate::Raft;
use crate::raft::NetworkFactory;
use crate::runtime::Runtime;
use crate::storage::events::Since;
use crate::storage::{QueryError, StateHandle};
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::{ChangeMembers, ReadPolicy};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

const FORWARDED: &str = "waft-forwarded";

use crate::auth::{Role, Tokens};

/// Limits on client requests.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest command or query payload, in bytes.
    pub max_payload_bytes: usize,
    /// Largest backup `Restore` accepts (it travels as one log entry).
    pub max_backup_bytes: usize,
    /// Most `Watch` streams open at once on this node.
    pub max_watches: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_payload_bytes: 1 << 20,
            max_backup_bytes: 128 << 20,
            max_watches: 1024,
        }
    }
}

/// Both API services share this.
#[derive(Clone)]
pub struct Api {
    id: NodeId,
    addr: String,
    raft: Raft,
    state: StateHandle,
    runtime: Runtime,
    peers: NetworkFactory,
    limits: ApiLimits,
    snapshot_dir: std::path::PathBuf,
    tokens: Arc<Tokens>,
    forwarder: Arc<forward::Forwarder>,
    rpc: Arc<trace::RpcMetrics>,
    /// One deploy at a time per service on this node, from the look at what the service runs
    /// to the new version's apply: an identical deploy that arrives meanwhile (a retry) then
    /// finds it running and changes nothing.
    deploying: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Open `Watch` streams, at most `limits.max_watches`.
    watches: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Where a call that needs the leader must go.
enum Route {
    Here,
    Leader(String),
}

/// A `SubmitBatch` may always carry this many payload bytes (more if single payloads may be
/// larger).
const MIN_BATCH_BYTES: usize = 16 << 20;

/// How long a call waits for an election to produce a leader before answering UNAVAILABLE.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A forwarded call that failed here, in the connection to the leader (it went away, the
/// connection dropped), rather than with a status the leader sent: UNAVAILABLE, which clients
/// retry, instead of the INTERNAL or UNKNOWN the transport reports. A write may or may not have
/// been applied; a retry with the same client session applies it at most once.
fn relay_failure(leader: &str, status: Status) -> Status {
    // Statuses that came over the wire have no source; ones made from a local error do.
    if std::error::Error::source(&status).is_none() {
        return status;
    }
    Status::unavailable(format!(
        "lost the connection to the leader at {leader} while forwarding ({}); a write may or \
         may not have been applied: retry (with the same client session, it applies once)",
        status.message()
    ))
}

fn no_leader() -> Status {
    Status::unavailable("no leader is known yet (an election may be in progress); retry shortly")
}

/// What a call forwarded to the leader carries of the caller's: its token and request id.
struct Caller {
    token: Option<tonic::metadata::AsciiMetadataValue>,
    request_id: Option<tonic::metadata::AsciiMetadataValue>,
}

fn forwarded<T>(req: &GrpcRequest<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

/// Refuses a request forwarded by a node of another cluster (its forwarding mark carries the
/// sender's cluster id): a follower whose idea of the leader's address is stale must not land
/// a client's write in a stranger's cluster. Installed on the client-facing services.
#[allow(clippy::result_large_err)]
pub fn forwarding_check(
    identity: std::sync::Arc<crate::raft::Identity>,
) -> impl FnMut(GrpcRequest<()>) -> Result<GrpcRequest<()>, Status> + Clone {
    move |req: GrpcRequest<()>| {
        let theirs = req
            .metadata()
            .get(FORWARDED)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() == 32);
        if let (Some(theirs), Some(ours)) = (theirs, identity.cluster())
            && theirs != ours
        {
            return Err(Status::failed_precondition(format!(
                "this node belongs to cluster {ours}; the request was forwarded by a node of \
                 cluster {theirs} (its leader address is stale); retry"
            )));
        }
        Ok(req)
    }
}

/// Maps openraft errors to statuses; `ForwardToLeader` becomes a route.
fn route_of<E>(
    e: &RaftError<crate::types::TypeConfig, E>,
    already_forwarded: bool,
) -> Result<Route, Status>
where
    E: openraft::TryAsRef<ForwardToLeader<crate::types::TypeConfig>> + std::error::Error,
{
    match e.forward_to_leader() {
        Some(f) if already_forwarded => Err(Status::unavailable(format!(
            "leadership moved while the request was being forwarded (leader now {:?}); retry",
            f.leader_id
        ))),
        Some(ForwardToLeader {
            leader_node: Some(node),
            ..
        }) => Ok(Route::Leader(node.addr.clone())),
        Some(_) => Err(no_leader()),
        None => Err(Status::unavailable(e.to_string())),
    }
}

fn write_error(
    e: &RaftError<crate::types::TypeConfig, ClientWriteError<crate::types::TypeConfig>>,
) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(m)) => {
            Status::failed_precondition(m.to_string())
        }
        other => Status::unavailable(other.to_string()),
    }
}

impl Api {
    /// Wraps a request this node forwards to the leader: marked as forwarded (so it is not
    /// forwarded again) with this node's cluster id (so a stranger refuses it).
    fn mark<T>(&self, caller: &Caller, msg: T) -> GrpcRequest<T> {
        let mut req = GrpcRequest::new(msg);
        if let Some(token) = &caller.token {
            req.metadata_mut()
                .insert(crate::auth::HEADER, token.clone());
        }
        if let Some(id) = &caller.request_id {
            req.metadata_mut().insert(trace::REQUEST_ID, id.clone());
        }
        let value = self
            .peers
            .identity()
            .cluster()
            .and_then(|id| id.parse().ok())
            .unwrap_or(tonic::metadata::MetadataValue::from_static("1"));
        req.metadata_mut().insert(FORWARDED, value);
        req
    }

    /// Checks the caller's token for a call that needs `role`; returns what a forwarded call
    /// carries on (the token, the request id).
    #[allow(clippy::result_large_err)]
    fn authorize<T>(&self, request: &GrpcRequest<T>, role: Role) -> Result<Caller, Status> {
        Ok(Caller {
            token: self.tokens.check(request.metadata(), role)?,
            request_id: request.metadata().get(trace::REQUEST_ID).cloned(),
        })
    }

    /// Requires tokens (see [`crate::auth`]).
    pub fn with_tokens(mut self, tokens: Tokens) -> Api {
        self.tokens = Arc::new(tokens);
        self
    }

    /// The API of the node with this Raft handle and state.
    pub fn new(
        id: NodeId,
        addr: String,
        raft: Raft,
        state: StateHandle,
        runtime: Runtime,
        peers: NetworkFactory,
        limits: ApiLimits,
    ) -> Api {
        let watches = Arc::new(tokio::sync::Semaphore::new(limits.max_watches));
        Api {
            id,
            addr,
            raft,
            state,
            runtime,
            peers,
            limits,
            snapshot_dir: std::path::PathBuf::new(),
            tokens: Arc::default(),
            forwarder: Arc::default(),
            deploying: Arc::default(),
            watches,
            rpc: Arc::default(),
        }
    }

    /// Where this node counts its calls (shared with the metrics endpoint).
    pub fn with_rpc_metrics(mut self, rpc: Arc<trace::RpcMetrics>) -> Api {
        self.rpc = rpc;
        self
    }

    /// Where this node's snapshots live (backups are read from there).
    pub fn with_snapshot_dir(mut self, dir: std::path::PathBuf) -> Api {
        self.snapshot_dir = dir;
        self
    }

    /// Takes a snapshot now (this node leads) and returns its bytes and index.
    async fn take_backup(&self) -> Result<(Vec<u8>, u64), Status> {
        let applied = self.state.last_applied().map_or(0, |l| l.index);
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if self.metrics().snapshot.is_some_and(|s| s.index >= applied) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(
                    "the snapshot for the backup was not built within 120 s",
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let path = self.snapshot_dir.join("current.snap");
        tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64)> {
            use std::io::Read;
            // Read through one open handle: a newer snapshot may replace the file meanwhile.
            let mut file = std::fs::File::open(&path)?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            let reader = crate::storage::snapshot::Reader::from_bytes(&bytes)?;
            let index = reader.header.meta.last_log_id.map_or(0, |l| l.index);
            drop(reader);
            Ok((bytes, index))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("reading the snapshot for the backup: {e}")))
    }

    fn waft_client(
        &self,
        addr: &str,
    ) -> Result<api::waft_client::WaftClient<tonic::transport::Channel>, Status> {
        let ch = self.peers.channel(addr).map_err(Status::unavailable)?;
        Ok(api::waft_client::WaftClient::new(ch)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    fn cluster_client(
        &self,
        addr: &str,
    ) -> Result<api::cluster_client::ClusterClient<tonic::transport::Channel>, Status> {
        let ch = self.peers.channel(addr).map_err(Status::unavailable)?;
        Ok(api::cluster_client::ClusterClient::new(ch))
    }

    fn check_payload(&self, len: usize) -> Result<(), Status> {
        if len > self.limits.max_payload_bytes {
            return Err(Status::resource_exhausted(format!(
                "payload of {len} bytes is over the {}-byte limit",
                self.limits.max_payload_bytes
            )));
        }
        Ok(())
    }

    /// The leader's address when it is another node; `Here` when this node leads.
    /// During an election no node knows a leader for a moment (about one election timeout).
    /// Rather than fail the call at once, wait up to [`LEADER_WAIT`] for one to be known; a
    /// request is only proposed after this, so waiting never changes what gets applied.
    async fn await_leader(&self) {
        use openraft::async_runtime::WatchReceiver;
        {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            // An uninitialized node has nobody to wait for.
            let initialized = m
                .membership_config
                .membership()
                .voter_ids()
                .next()
                .is_some();
            if m.current_leader.is_some() || !initialized {
                return;
            }
        }
        let _ = self
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await;
    }

    async fn leader_route(&self, already_forwarded: bool) -> Result<Route, Status> {
        self.await_leader().await;
        let leader = self.raft.current_leader().await.ok_or_else(no_leader)?;
        if leader == self.id {
            return Ok(Route::Here);
        }
        if already_forwarded {
            return Err(Status::unavailable(
                "this node is no longer the leader; retry",
            ));
        }
        let m = self.metrics();
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .ok_or_else(no_leader)?;
        Ok(Route::Leader(addr))
    }

    fn metrics(&self) -> openraft::RaftMetrics<crate::types::TypeConfig> {
        use openraft::async_runtime::WatchReceiver;
        self.raft.metrics().borrow_watched().clone()
    }

    /// The log entry for a Submit, or why it cannot be one.
    #[allow(clippy::result_large_err)]
    fn command(&self, req: &api::SubmitRequest) -> Result<Request, Status> {
        self.check_payload(req.payload.len())?;
        if req.service.is_empty() {
            return Err(Status::invalid_argument("a service name is required"));
        }
        let client = (req.client_id != 0).then_some(ClientSeq {
            client_id: req.client_id,
            seq: req.sequence,
        });
        Ok(Request::Command {
            service: req.service.clone(),
            payload: req.payload.clone(),
            client,
            timestamp_ms: now_ms(),
        })
    }

    async fn write(
        &self,
        request: Request,
        already_forwarded: bool,
    ) -> Result<Result<(u64, Response), Route>, Status> {
        self.await_leader().await;
        match self.raft.client_write(request).await {
            Ok(resp) => Ok(Ok((resp.log_id.index, resp.data))),
            Err(e) if e.forward_to_leader().is_some() => route_of(&e, already_forwarded).map(Err),
            Err(e) => Err(write_error(&e)),
        }
    }

    /// Checks, before anything is proposed, that `module` compiles, implements the world and
    /// accepts the current state of `service` in a throwaway instance (what applying the swap
    /// will do). Returns the module's sha256. The compiled module stays cached for the apply.
    async fn validate(
        &self,
        service: &str,
        module: Arc<Vec<u8>>,
        limits: crate::types::ServiceLimits,
        what: &str,
    ) -> Result<String, Status> {
        let current = self.state.service_state(service).await.map_err(|e| {
            Status::unavailable(format!("cannot read the current state of {service:?}: {e}"))
        })?;
        let runtime = self.runtime.clone();
        let (service, what) = (service.to_owned(), what.to_owned());
        tokio::task::spawn_blocking(move || -> Result<String, Status> {
            let refused = |e: &dyn std::fmt::Display| Status::invalid_argument(format!("module refused: {e}"));
            let loaded = runtime.load(&module).map_err(|e| refused(&e))?;
            let mut trial = runtime
                .instantiate_with(&loaded, &service, limits.apply_to(runtime.limits().clone()))
                .map_err(|e| refused(&e))?;
            if let Some(state) = current {
                trial.restore(&state).map_err(|e| {
                    Status::failed_precondition(format!(
                        "{what} refused the current state of {service:?}, so the running version stays: {e}"
                    ))
                })?;
            }
            Ok(loaded.hash().to_hex())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    /// Runs the new module beside the running one on the service's history (or the header's
    /// commands) and, if asked, the determinism verifier on those commands.
    async fn try_module(
        &self,
        header: &api::DeployHeader,
        module: &[u8],
        limits: crate::types::ServiceLimits,
    ) -> Result<(Option<api::TrialReport>, Vec<String>), Status> {
        let running = self.state.running(&header.service);
        let runtime = self.runtime.clone();
        let (service, bytes) = (header.service.clone(), module.to_vec());
        let file = (!header.replay.is_empty()).then(|| header.replay.clone());
        let verify = header.verify;
        tokio::task::spawn_blocking(move || {
            let loaded = runtime
                .load(&bytes)
                .map_err(|e| Status::invalid_argument(format!("module refused: {e}")))?;
            let new_limits = limits.apply_to(runtime.limits().clone());
            let trial = match &running {
                None => None,
                Some(r) => Some(
                    crate::trial::trial(
                        &runtime,
                        &service,
                        r,
                        &loaded,
                        new_limits,
                        file.as_deref(),
                    )
                    .map_err(Status::failed_precondition)?,
                ),
            };
            let mut findings = Vec::new();
            if verify {
                let commands = match (&trial, &file) {
                    (Some(t), _) => t.replayed.clone(),
                    (None, Some(f)) => f.clone(),
                    (None, None) => Vec::new(),
                };
                if commands.is_empty() {
                    return Err(Status::invalid_argument(
                        "--verify needs commands: the service has applied none since its last \
                         rebase; give some with --replay FILE",
                    ));
                }
                let report =
                    crate::verify::verify_fresh(runtime.limits().clone(), &bytes, commands)
                        .map_err(|e| Status::internal(format!("the verifier failed: {e}")))?;
                findings = report.findings.iter().map(ToString::to_string).collect();
            }
            let trial = trial.map(|t| api::TrialReport {
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
            });
            Ok((trial, findings))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    /// Proposes a deploy or rollback entry on this (leader) node and maps the outcome.
    /// Waits for this node's turn to deploy to `service` (see `Api::deploying`).
    async fn deploy_turn(&self, service: &str) -> DeployTurn {
        let lock = self
            .deploying
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(service.to_owned())
            .or_default()
            .clone();
        DeployTurn {
            guard: Some(lock.lock_owned().await),
            service: service.to_owned(),
            all: self.deploying.clone(),
        }
    }

    async fn propose_swap(
        &self,
        entry: Request,
        what: &str,
    ) -> Result<GrpcResponse<api::DeployReply>, Status> {
        match self.write(entry, true).await? {
            Ok((index, Response::Deployed { module, version })) => {
                Ok(GrpcResponse::new(api::DeployReply {
                    module_sha256: module,
                    index,
                    dry_run: false,
                    version,
                    unchanged: false,
                    ..Default::default()
                }))
            }
            Ok((_, Response::DeployFailed(why))) => {
                Err(Status::failed_precondition(format!("{what} failed: {why}")))
            }
            Ok((_, Response::NoSuchService(s))) => {
                Err(Status::not_found(format!("no service named {s:?}")))
            }
            Ok((_, other)) => Err(Status::internal(format!(
                "unexpected response to a {what}: {other:?}"
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "leadership moved during the {what}; retry"
            ))),
        }
    }

    /// Maps the outcome of a membership change: a reply, a forward to the leader (through
    /// `forward`, given a client of the leader's Cluster service), or an error.
    async fn membership_outcome<F, Fut>(
        &self,
        result: Result<
            openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
            RaftError<
                crate::types::TypeConfig,
                ClientWriteError<crate::types::TypeConfig>,
            >,
        >,
        already_forwarded: bool,
        forward: F,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status>
    where
        F: FnOnce(api::cluster_client::ClusterClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = Result<GrpcResponse<api::MembershipReply>, Status>>,
    {
        match result {
            Ok(r) => Ok(GrpcResponse::new(self.membership_reply(r.log_id.index))),
            Err(e) if e.forward_to_leader().is_some() => match route_of(&e, already_forwarded)? {
                Route::Leader(addr) => forward(self.cluster_client(&addr)?)
                    .await
                    .map_err(|s| relay_failure(&addr, s)),
                Route::Here => Err(no_leader()),
            },
            Err(e) => Err(write_error(&e)),
        }
    }

    fn membership_reply(&self, index: u64) -> api::MembershipReply {
        api::MembershipReply {
            members: members(&self.metrics()),
            index,
        }
    }
}

fn members(m: &openraft::RaftMetrics<crate::types::TypeConfig>) -> Vec<api::MemberStatus> {
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
            }
        })
        .collect()
}

fn audit_status(a: &crate::storage::AuditStatus) -> api::AuditStatus {
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

fn submit_reply(index: u64, response: Response) -> Result<api::SubmitReply, Status> {
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

#[tonic::async_trait]
impl waft_server::Waft for Api {
    async fn submit(
        &self,
        request: GrpcRequest<api::SubmitRequest>,
    ) -> Result<GrpcResponse<api::SubmitReply>, Status> {
        let auth = self.authorize(&request, Role::Client)?;
        let fwd = forwarded(&request);
        let req = request.into_inner();
        let entry = self.command(&req)?;
        match self.write(entry, fwd).await? {
            Ok((index, response)) => Ok(GrpcResponse::new(submit_reply(index, response)?)),
            // Joins the follower's batch for the leader (see `forward`).
            Err(Route::Leader(addr)) => {
                let (reply, served_by) = self.forwarder.submit(self, &addr, &auth, req).await?;
                let mut reply = GrpcResponse::new(reply);
                if let Some(leader) = served_by {
                    reply.metadata_mut().insert(trace::SERVED_BY, leader);
                }
                Ok(reply)
            }
            Err(Route::Here) => Err(no_leader()),
        }
    }

    async fn submit_batch(
        &self,
        request: GrpcRequest<api::SubmitBatchRequest>,
    ) -> Result<GrpcResponse<api::SubmitBatchReply>, Status> {
        let auth = self.authorize(&request, Role::Client)?;
        let fwd = forwarded(&request);
        let req = request.into_inner();
        let n = req.commands.len();
        if n > forward::MAX_COMMANDS {
            return Err(Status::resource_exhausted(format!(
                "a batch of {n} commands is over the limit of {}; split it",
                forward::MAX_COMMANDS
            )));
        }
        let bytes: usize = req.commands.iter().map(|c| c.payload.len()).sum();
        let max_bytes = self.limits.max_payload_bytes.max(MIN_BATCH_BYTES);
        if bytes > max_bytes {
            return Err(Status::resource_exhausted(format!(
                "a batch of {bytes} payload bytes is over the limit of {max_bytes}; split it"
            )));
        }
        if let Route::Leader(addr) = self.leader_route(fwd).await? {
            return self
                .waft_client(&addr)?
                .submit_batch(self.mark(&auth, req))
                .await
                .map_err(|s| relay_failure(&addr, s));
        }
        // Each command is checked as its own Submit would be; the valid ones are proposed
        // together, in order, in one message to Raft.
        let mut results: Vec<Option<api::SubmitResult>> = vec![None; n];
        let mut entries = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        for (i, c) in req.commands.iter().enumerate() {
            match self.command(c) {
                Ok(entry) => {
                    entries.push(entry);
                    slots.push(i);
                }
                Err(s) => results[i] = Some(forward::to_result(Err(s))),
            }
        }
        if !entries.is_empty() {
            use futures::StreamExt;
            let mut answers = self
                .raft
                .client_write_many(entries)
                .await
                .map_err(|e| Status::unavailable(format!("raft stopped: {e}")))?;
            for slot in slots {
                let answer = match answers.next().await {
                    Some(Ok(Ok(written))) => submit_reply(written.log_id.index, written.response),
                    // Not proposed: leadership moved while the batch waited.
                    Some(Ok(Err(ClientWriteError::ForwardToLeader(_)))) => {
                        Err(Status::unavailable(
                            "this node stopped leading before the command was proposed; retry",
                        ))
                    }
                    Some(Ok(Err(e))) => Err(write_error(&RaftError::APIError(e))),
                    Some(Err(fatal)) => Err(Status::unavailable(format!("raft stopped: {fatal}"))),
                    None => Err(Status::unavailable("raft stopped; retry")),
                };
                results[slot] = Some(forward::to_result(answer));
            }
        }
        Ok(GrpcResponse::new(api::SubmitBatchReply {
            results: results.into_iter().flatten().collect(),
        }))
    }

    async fn query(
        &self,
        request: GrpcRequest<api::QueryRequest>,
    ) -> Result<GrpcResponse<api::QueryReply>, Status> {
        let auth = self.authorize(&request, Role::Client)?;
        let fwd = forwarded(&request);
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
            return match route_of(&e, fwd)? {
                Route::Leader(addr) => self
                    .waft_client(&addr)?
                    .query(self.mark(&auth, req))
                    .await
                    .map_err(|s| relay_failure(&addr, s)),
                Route::Here => Err(no_leader()),
            };
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
        let auth = self.authorize(&request, Role::Admin)?;
        let fwd = forwarded(&request);
        let mut input = request.into_inner();
        let max = self.runtime.limits().max_module_bytes;
        let header = match input.message().await?.and_then(|c| c.kind) {
            Some(api::deploy_chunk::Kind::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "a deploy stream must start with its header",
                ));
            }
        };
        if header.service.is_empty() {
            return Err(Status::invalid_argument("a service name is required"));
        }
        if header.size == 0 {
            return Err(Status::invalid_argument("the module is empty (0 bytes)"));
        }
        if header.size > max as u64 {
            return Err(Status::resource_exhausted(format!(
                "module of {} bytes is over the {max}-byte limit",
                header.size
            )));
        }
        let mut module = Vec::with_capacity(header.size as usize);
        while let Some(chunk) = input.message().await? {
            let Some(api::deploy_chunk::Kind::Data(data)) = chunk.kind else {
                return Err(Status::invalid_argument(
                    "a deploy header may only come first",
                ));
            };
            if module.len() + data.len() > header.size as usize {
                return Err(Status::invalid_argument(
                    "the upload is longer than its header said",
                ));
            }
            module.extend_from_slice(&data);
        }
        if module.len() as u64 != header.size {
            return Err(Status::invalid_argument(format!(
                "the upload ended after {} of {} bytes",
                module.len(),
                header.size
            )));
        }
        if let Route::Leader(addr) = self.leader_route(fwd).await? {
            let chunks = crate::pb::deploy_chunks_with(header, &module);
            return self
                .waft_client(&addr)?
                .deploy(self.mark(&auth, futures::stream::iter(chunks)))
                .await
                .map_err(|s| relay_failure(&addr, s));
        }
        let limits = crate::types::ServiceLimits {
            fuel_per_apply: (header.fuel_per_apply != 0).then_some(header.fuel_per_apply),
            max_memory_bytes: (header.max_memory_bytes != 0).then_some(header.max_memory_bytes),
        };
        let _turn = if header.dry_run {
            None
        } else {
            Some(self.deploy_turn(&header.service).await)
        };
        // Deploying what the service already runs, as it runs it, changes nothing: no entry,
        // no new version (a deploy retried after its connection dropped, though the first
        // attempt went through, must not add one).
        if !header.dry_run {
            let sha = crate::runtime::ModuleHash::of(&module).to_hex();
            let active = self
                .state
                .services()
                .into_iter()
                .find(|s| s.name == header.service)
                .and_then(|s| s.history.last().cloned())
                .filter(|v| v.module == sha && v.limits == limits);
            if let Some(active) = active {
                return Ok(GrpcResponse::new(api::DeployReply {
                    module_sha256: sha,
                    index: active.deployed_at,
                    dry_run: false,
                    version: active.version,
                    unchanged: true,
                    ..Default::default()
                }));
            }
        }
        let hash = self
            .validate(
                &header.service,
                Arc::new(module.clone()),
                limits,
                "the new module",
            )
            .await?;
        let (trial, findings) = if header.dry_run || header.verify {
            self.try_module(&header, &module, limits).await?
        } else {
            (None, Vec::new())
        };
        if header.dry_run {
            return Ok(GrpcResponse::new(api::DeployReply {
                module_sha256: hash,
                index: 0,
                dry_run: true,
                version: 0,
                unchanged: false,
                trial,
                findings,
            }));
        }
        if !findings.is_empty() && !header.force {
            return Err(Status::failed_precondition(format!(
                "the determinism verifier found {} problem(s) with the new module, so it was not \
                 deployed (deploy with --force to override):\n{}",
                findings.len(),
                findings.join("\n")
            )));
        }
        if !findings.is_empty() {
            tracing::warn!(
                service = %header.service,
                findings = findings.len(),
                "deploying a module the determinism verifier flagged (forced)"
            );
            let entry = Request::ForcedDeploy {
                service: header.service.clone(),
                module,
                engine: self.runtime.fingerprint().to_owned(),
                limits,
                timestamp_ms: now_ms(),
                findings: findings.join("\n"),
            };
            return self.propose_swap(entry, "deploy").await;
        }
        let entry = Request::Deploy {
            service: header.service.clone(),
            module,
            engine: self.runtime.fingerprint().to_owned(),
            limits,
            timestamp_ms: now_ms(),
        };
        self.propose_swap(entry, "deploy").await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: GrpcRequest<api::WatchRequest>,
    ) -> Result<GrpcResponse<WatchStream>, Status> {
        self.authorize(&request, Role::Client)?;
        let req = request.into_inner();
        let Ok(permit) = self.watches.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "this node already serves {} watches, its limit; watch through another node or \
                 end a watch first",
                self.limits.max_watches
            )));
        };
        let events = self.state.events();
        let start = match req.start_index {
            0 => events.last() + 1,
            i => i,
        };
        if let Since::Gone { first } = events.since(start, &req.service, 0) {
            return Err(history_gone(start, first));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            let _permit = permit;
            let mut grew = events.subscribe();
            let mut next = start;
            loop {
                grew.borrow_and_update();
                match events.since(next, &req.service, WATCH_BUFFER) {
                    Since::Gone { first } => {
                        let _ = tx.send(Err(history_gone(next, first))).await;
                        return;
                    }
                    Since::Events {
                        events: found,
                        upto,
                    } => {
                        let more = found.len() == WATCH_BUFFER;
                        for e in found {
                            if tx.send(Ok(watch_event(&e))).await.is_err() {
                                return;
                            }
                        }
                        next = next.max(upto + 1);
                        if more {
                            continue;
                        }
                    }
                }
                if events.is_closed() {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "the node is stopping; watch another node from index {next}"
                        ))))
                        .await;
                    return;
                }
                tokio::select! {
                    changed = grew.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(GrpcResponse::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn rollback(
        &self,
        request: GrpcRequest<api::RollbackRequest>,
    ) -> Result<GrpcResponse<api::DeployReply>, Status> {
        let auth = self.authorize(&request, Role::Admin)?;
        let fwd = forwarded(&request);
        let req = request.into_inner();
        if let Route::Leader(addr) = self.leader_route(fwd).await? {
            return self
                .waft_client(&addr)?
                .rollback(self.mark(&auth, req))
                .await
                .map_err(|s| relay_failure(&addr, s));
        }
        let to = (req.to_version != 0).then_some(req.to_version);
        if !self.state.services().iter().any(|s| s.name == req.service) {
            return Err(Status::not_found(format!(
                "no service named {:?}",
                req.service
            )));
        }
        // Validate like a deploy: the target version must exist and accept the current state.
        let (version, module, limits) =
            self.state.version_module(&req.service, to).ok_or_else(|| {
                Status::failed_precondition(match to {
                    Some(v) => format!("service {:?} has no kept version {v}", req.service),
                    None => format!(
                        "service {:?} has no earlier version to roll back to",
                        req.service
                    ),
                })
            })?;
        self.validate(&req.service, module, limits, &format!("version {version}"))
            .await?;
        let entry = Request::Rollback {
            service: req.service.clone(),
            to: Some(version),
            timestamp_ms: now_ms(),
        };
        self.propose_swap(entry, "rollback").await
    }

    async fn list_services(
        &self,
        request: GrpcRequest<api::ListServicesRequest>,
    ) -> Result<GrpcResponse<api::ListServicesReply>, Status> {
        self.authorize(&request, Role::Client)?;
        let sizes = self.state.service_states().await.unwrap_or_default();
        let services = self
            .state
            .services()
            .into_iter()
            .map(|s| api::ServiceInfo {
                state_bytes: sizes.get(&s.name).map_or(0, |b| b.len() as u64),
                module_sha256: s.module.hash.to_hex(),
                module_size: s.module.size as u64,
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
            })
            .collect();
        Ok(GrpcResponse::new(api::ListServicesReply { services }))
    }
}

type WatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<api::WatchEvent, Status>> + Send>>;

/// Events a watch sends ahead of its client before it waits for the client to read.
const WATCH_BUFFER: usize = 256;

/// A watch asked for events the node's history no longer holds.
fn history_gone(from: u64, first: u64) -> Status {
    Status::out_of_range(format!(
        "events from index {from} are no longer kept on this node (its history starts at index \
         {first}; it starts afresh when the node restarts or installs a snapshot): read the \
         current state with a query, then watch from index {first} or from now"
    ))
}

fn watch_event(e: &crate::storage::events::Event) -> api::WatchEvent {
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
        }),
    }
}

type BackupStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<api::BackupChunk, Status>> + Send>>;

fn backup_chunks(bytes: Vec<u8>, index: u64, force: bool) -> Vec<api::BackupChunk> {
    use api::backup_chunk::Kind;
    let header = api::BackupChunk {
        kind: Some(Kind::Header(api::BackupHeader {
            size: bytes.len() as u64,
            index,
            force,
        })),
    };
    std::iter::once(header)
        .chain(bytes.chunks(1 << 20).map(|c| api::BackupChunk {
            kind: Some(Kind::Data(c.to_vec())),
        }))
        .collect()
}

/// Builds the chunks of a backup upload (for `waft restore`).
pub fn restore_chunks(bytes: &[u8], force: bool) -> Vec<api::BackupChunk> {
    backup_chunks(bytes.to_vec(), 0, force)
}

#[tonic::async_trait]
impl cluster_server::Cluster for Api {
    type BackupStream = BackupStream;

    async fn backup(
        &self,
        request: GrpcRequest<api::BackupRequest>,
    ) -> Result<GrpcResponse<BackupStream>, Status> {
        let auth = self.authorize(&request, Role::Admin)?;
        let fwd = forwarded(&request);
        match self.leader_route(fwd).await? {
            Route::Here => {
                let (bytes, index) = self.take_backup().await?;
                let chunks = backup_chunks(bytes, index, false);
                Ok(GrpcResponse::new(Box::pin(futures::stream::iter(
                    chunks.into_iter().map(Ok),
                ))))
            }
            Route::Leader(addr) => {
                let upstream = self
                    .cluster_client(&addr)?
                    .max_decoding_message_size(usize::MAX)
                    .backup(self.mark(&auth, api::BackupRequest {}))
                    .await
                    .map_err(|s| relay_failure(&addr, s))?
                    .into_inner();
                Ok(GrpcResponse::new(Box::pin(upstream)))
            }
        }
    }

    async fn restore(
        &self,
        request: GrpcRequest<Streaming<api::BackupChunk>>,
    ) -> Result<GrpcResponse<api::RestoreReply>, Status> {
        let auth = self.authorize(&request, Role::Admin)?;
        use api::backup_chunk::Kind;
        let fwd = forwarded(&request);
        let mut input = request.into_inner();
        let header = match input.message().await?.and_then(|c| c.kind) {
            Some(Kind::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "a restore stream must start with its header",
                ));
            }
        };
        if header.size > self.limits.max_backup_bytes as u64 {
            return Err(Status::resource_exhausted(format!(
                "backup of {} bytes is over the {}-byte limit",
                header.size, self.limits.max_backup_bytes
            )));
        }
        let mut bytes = Vec::with_capacity(header.size as usize);
        while let Some(chunk) = input.message().await? {
            let Some(Kind::Data(data)) = chunk.kind else {
                return Err(Status::invalid_argument(
                    "a restore header may only come first",
                ));
            };
            if bytes.len() + data.len() > header.size as usize {
                return Err(Status::invalid_argument(format!(
                    "restore stream is longer than the {} bytes its header announced",
                    header.size
                )));
            }
            bytes.extend_from_slice(&data);
        }
        if bytes.len() as u64 != header.size {
            return Err(Status::invalid_argument(format!(
                "restore stream ended after {} of {} bytes",
                bytes.len(),
                header.size
            )));
        }
        if let Route::Leader(addr) = self.leader_route(fwd).await? {
            let chunks = backup_chunks(bytes, header.index, header.force);
            return self
                .cluster_client(&addr)?
                .max_encoding_message_size(usize::MAX)
                .restore(self.mark(&auth, futures::stream::iter(chunks)))
                .await
                .map_err(|s| relay_failure(&addr, s));
        }
        // Validate before proposing: a backup that does not load never reaches the log.
        let bytes = Arc::new(bytes);
        self.state
            .check_backup(bytes.clone())
            .await
            .map_err(|e| Status::invalid_argument(format!("not a usable backup: {e}")))?;
        let bytes = Arc::try_unwrap(bytes).unwrap_or_else(|shared| shared.to_vec());
        let entry = Request::Restore {
            backup: bytes,
            force: header.force,
            timestamp_ms: now_ms(),
        };
        match self.write(entry, true).await? {
            Ok((index, Response::Restored(services))) => {
                Ok(GrpcResponse::new(api::RestoreReply { index, services }))
            }
            Ok((_, Response::DeployFailed(why))) => Err(Status::failed_precondition(why)),
            Ok((_, other)) => Err(Status::internal(format!(
                "unexpected response to a restore: {other:?}"
            ))),
            Err(_) => Err(Status::unavailable(
                "leadership moved during the restore; retry",
            )),
        }
    }

    async fn init(
        &self,
        request: GrpcRequest<api::InitRequest>,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        self.authorize(&request, Role::Admin)?;
        let req = request.into_inner();
        let mut members: BTreeMap<NodeId, RaftNode> = req
            .members
            .into_iter()
            .map(|m| (m.id, RaftNode { addr: m.addr }))
            .collect();
        if members.is_empty() {
            members.insert(
                self.id,
                RaftNode {
                    addr: self.addr.clone(),
                },
            );
        }
        // A cluster id first (see raft::identity), unless this node is already a member, in
        // which case initialize refuses below and nothing changes.
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !initialized {
            self.peers.identity().create().map_err(|e| {
                Status::unavailable(format!("cannot record the new cluster's id: {e}"))
            })?;
        }
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(e) => Status::failed_precondition(e.to_string()),
            RaftError::Fatal(f) => Status::unavailable(f.to_string()),
        })?;
        // Return once the first leader has committed the initial membership, so the next admin
        // call (add a learner) is not refused as "a membership change is in progress". A cluster
        // whose other members are not up yet cannot get there: then return anyway.
        let _ = self
            .raft
            .wait(Some(std::time::Duration::from_secs(5)))
            .applied_index_at_least(Some(1), "initial membership committed")
            .await;
        Ok(GrpcResponse::new(self.membership_reply(0)))
    }

    async fn add_learner(
        &self,
        request: GrpcRequest<api::AddLearnerRequest>,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        let auth = self.authorize(&request, Role::Admin)?;
        let fwd = forwarded(&request);
        let req = request.into_inner();
        if req.addr.is_empty() {
            return Err(Status::invalid_argument(
                "the learner's address is required",
            ));
        }
        // openraft keeps a member's old address when it is added again: a node that reuses a
        // member's id from another address would be told yes and never hear from the leader.
        if let Some(at) = self
            .metrics()
            .membership_config
            .membership()
            .get_node(&req.id)
            .map(|n| n.addr.clone())
            .filter(|at| *at != req.addr)
        {
            return Err(Status::already_exists(format!(
                "node id {} is already a member, at {at}; choose another id, or remove node {} \
                 first (waft cluster remove {})",
                req.id, req.id, req.id
            )));
        }
        let result = self
            .raft
            .add_learner(
                req.id,
                RaftNode {
                    addr: req.addr.clone(),
                },
                true,
            )
            .await;
        self.membership_outcome(result, fwd, |mut c| async move {
            c.add_learner(self.mark(&auth, req)).await
        })
        .await
    }

    async fn change_membership(
        &self,
        request: GrpcRequest<api::ChangeMembershipRequest>,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        let auth = self.authorize(&request, Role::Admin)?;
        let fwd = forwarded(&request);
        let req = request.into_inner();
        let change = match (req.voters.is_empty(), req.add_voters.is_empty()) {
            (true, true) => {
                return Err(Status::invalid_argument(
                    "a cluster needs at least one voter",
                ));
            }
            (false, false) => {
                return Err(Status::invalid_argument(
                    "give either voters or add_voters, not both",
                ));
            }
            (false, true) => ChangeMembers::ReplaceAllVoters(req.voters.iter().copied().collect()),
            (true, false) => ChangeMembers::AddVoterIds(req.add_voters.iter().copied().collect()),
        };
        let result = self.raft.change_membership(change, req.retain).await;
        self.membership_outcome(result, fwd, |mut c| async move {
            c.change_membership(self.mark(&auth, req)).await
        })
        .await
    }

    async fn remove_node(
        &self,
        request: GrpcRequest<api::RemoveNodeRequest>,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        let auth = self.authorize(&request, Role::Admin)?;
        let fwd = forwarded(&request);
        let req = request.into_inner();
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let is_voter = membership.voter_ids().any(|v| v == req.id);
        let is_member = membership.get_node(&req.id).is_some();
        if !is_member {
            return Err(Status::not_found(format!(
                "node {} is not a member",
                req.id
            )));
        }
        if is_voter && membership.voter_ids().count() == 1 {
            return Err(Status::failed_precondition(format!(
                "node {} is the last voter; a cluster cannot remove its last voter",
                req.id
            )));
        }
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([req.id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([req.id]))
        };
        // `retain = false`: a removed voter leaves the cluster, it is not kept as a learner.
        let result = self.raft.change_membership(change, false).await;
        self.membership_outcome(result, fwd, |mut c| async move {
            c.remove_node(self.mark(&auth, req)).await
        })
        .await
    }

    async fn transfer_leader(
        &self,
        request: GrpcRequest<api::TransferLeaderRequest>,
    ) -> Result<GrpcResponse<api::TransferLeaderReply>, Status> {
        let auth = self.authorize(&request, Role::Admin)?;
        let fwd = forwarded(&request);
        let req = request.into_inner();
        let m = self.metrics();
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == req.to)
        {
            return Err(Status::failed_precondition(format!(
                "node {} is not a voter",
                req.to
            )));
        }
        match self.leader_route(fwd).await? {
            Route::Here => {
                self.raft
                    .trigger()
                    .transfer_leader(req.to)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                Ok(GrpcResponse::new(api::TransferLeaderReply {}))
            }
            Route::Leader(addr) => self
                .cluster_client(&addr)?
                .transfer_leader(self.mark(&auth, req))
                .await
                .map_err(|s| relay_failure(&addr, s)),
        }
    }

    async fn status(
        &self,
        request: GrpcRequest<api::StatusRequest>,
    ) -> Result<GrpcResponse<api::StatusReply>, Status> {
        self.authorize(&request, Role::Client)?;
        let m = self.metrics();
        let leader_addr = m
            .current_leader
            .and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone())
            })
            .unwrap_or_default();
        Ok(GrpcResponse::new(api::StatusReply {
            node_id: self.id,
            role: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            committed_index: m.local_committed.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            members: members(&m),
            engine: self.runtime.fingerprint().to_owned(),
            audit: Some(audit_status(&self.state.audit_status())),
            cluster_id: self.peers.identity().cluster().unwrap_or_default(),
        }))
    }

    async fn audit(
        &self,
        request: GrpcRequest<api::AuditRequest>,
    ) -> Result<GrpcResponse<api::AuditReply>, Status> {
        let auth = self.authorize(&request, Role::Admin)?;
        let fwd = forwarded(&request);
        match crate::audit::audit_now(&self.raft, &self.peers).await {
            Ok(o) => Ok(GrpcResponse::new(api::AuditReply {
                index: o.digest.index,
                report_index: o.report_index,
                services: o
                    .digest
                    .services
                    .into_iter()
                    .map(|d| api::ServiceDigest {
                        service: d.name,
                        version: d.version,
                        module_sha256: d.module,
                        state_sha256: d.state,
                        state_bytes: d.state_len,
                    })
                    .collect(),
                sessions_sha256: o.digest.sessions,
            })),
            Err(crate::audit::AuditError::Raft(e)) if e.forward_to_leader().is_some() => {
                match route_of(&e, fwd)? {
                    Route::Leader(addr) => self
                        .cluster_client(&addr)?
                        .audit(self.mark(&auth, api::AuditRequest {}))
                        .await
                        .map_err(|s| relay_failure(&addr, s)),
                    Route::Here => Err(no_leader()),
                }
            }
            Err(crate::audit::AuditError::Raft(e)) => Err(write_error(&e)),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn trigger_snapshot(
        &self,
        request: GrpcRequest<api::TriggerSnapshotRequest>,
    ) -> Result<GrpcResponse<api::TriggerSnapshotReply>, Status> {
        self.authorize(&request, Role::Admin)?;
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(GrpcResponse::new(api::TriggerSnapshotReply {}))
    }
}

/// A deploy's turn on its service; the service's lock is forgotten once nobody holds or waits
/// for it.
struct DeployTurn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    service: String,
    all: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Drop for DeployTurn {
    fn drop(&mut self) {
        self.guard.take();
        let mut all = self.all.lock().unwrap_or_else(PoisonError::into_inner);
        if all
            .get(&self.service)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            all.remove(&self.service);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_to_the_leader_is_retryable_and_a_leaders_status_is_kept() {
        let dropped = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        let relayed = relay_failure("10.0.0.1:7000", dropped);
        assert_eq!(relayed.code(), tonic::Code::Unavailable);
        assert!(relayed.message().contains("10.0.0.1:7000"), "{relayed}");
        assert!(relayed.message().contains("connection reset"), "{relayed}");
        // What the leader itself answered (no local source) goes back as it is.
        let theirs = Status::internal("the leader's own fault");
        let kept = relay_failure("10.0.0.1:7000", theirs);
        assert_eq!(kept.code(), tonic::Code::Internal);
        assert_eq!(kept.message(), "the leader's own fault");
    }
}
