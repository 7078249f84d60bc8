//! The admin plane, `waft.v1.Cluster`: membership (init, learners, voters, removal, leader
//! transfer), status, audits and snapshots; backups and restores are in [`super::backup`].

use super::router::{Caller, Clients, Router, write_error};
use super::{ApiLimits, convert};
use crate::pb::api;
use crate::runtime::Runtime;
use crate::storage::StateHandle;
use crate::types::{Node as RaftNode, NodeId, TypeConfig};
use openraft::ChangeMembers;
use openraft::error::{ClientWriteError, RaftError};
use std::collections::{BTreeMap, BTreeSet};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

/// Membership, status, audits and snapshots of one node.
#[derive(Clone)]
pub(super) struct Admin {
    router: Router,
    /// The address this node's peers and clients reach it at.
    addr: String,
    state: StateHandle,
    runtime: Runtime,
    limits: ApiLimits,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Admin {
    pub(super) fn new(
        router: Router,
        addr: String,
        state: StateHandle,
        runtime: Runtime,
        limits: ApiLimits,
    ) -> Admin {
        Admin {
            router,
            addr,
            state,
            runtime,
            limits,
        }
    }

    /// The reply to a membership change; where another node leads, `req` goes there through
    /// `call` instead.
    async fn membership_outcome<T, F, Fut>(
        &self,
        result: Result<
            openraft::raft::ClientWriteResponse<TypeConfig>,
            RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
        >,
        caller: &Caller,
        req: T,
        call: F,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status>
    where
        F: FnOnce(Clients, GrpcRequest<T>) -> Fut,
        Fut: Future<Output = Result<GrpcResponse<api::MembershipReply>, Status>>,
    {
        match result {
            Ok(r) => Ok(GrpcResponse::new(self.membership_reply(r.log_id.index))),
            Err(e) if e.forward_to_leader().is_some() => {
                self.router.leader_of(&e, caller)?.relay(req, call).await
            }
            Err(e) => Err(write_error(&e)),
        }
    }

    fn membership_reply(&self, index: u64) -> api::MembershipReply {
        api::MembershipReply {
            members: convert::members(&self.router.metrics()),
            index,
        }
    }
}

impl Admin {
    pub(super) async fn init(
        &self,
        req: api::InitRequest,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        let mut members: BTreeMap<NodeId, RaftNode> = req
            .members
            .into_iter()
            .map(|m| (m.id, RaftNode { addr: m.addr }))
            .collect();
        if members.is_empty() {
            members.insert(
                self.router.id(),
                RaftNode {
                    addr: self.addr.clone(),
                },
            );
        }
        // A cluster id first (see raft::identity), unless this node is already a member, in
        // which case initialize refuses below and nothing changes.
        let initialized = self
            .router
            .raft()
            .is_initialized()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !initialized {
            self.router.peers().identity().create().map_err(|e| {
                Status::unavailable(format!("cannot record the new cluster's id: {e}"))
            })?;
        }
        self.router
            .raft()
            .initialize(members)
            .await
            .map_err(|e| match e {
                RaftError::APIError(e) => Status::failed_precondition(e.to_string()),
                RaftError::Fatal(f) => Status::unavailable(f.to_string()),
            })?;
        // Return once the first leader has committed the initial membership, so the next admin
        // call (add a learner) is not refused as "a membership change is in progress". A cluster
        // whose other members are not up yet cannot get there: then return anyway.
        let _ = self
            .router
            .raft()
            .wait(Some(std::time::Duration::from_secs(5)))
            .applied_index_at_least(Some(1), "initial membership committed")
            .await;
        Ok(GrpcResponse::new(self.membership_reply(0)))
    }

    pub(super) async fn add_learner(
        &self,
        caller: &Caller,
        req: api::AddLearnerRequest,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        if req.addr.is_empty() {
            return Err(Status::invalid_argument(
                "the learner's address is required",
            ));
        }
        // openraft keeps a member's old address when it is added again: a node that reuses a
        // member's id from another address would be told yes and never hear from the leader.
        if let Some(at) = self
            .router
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
            .router
            .raft()
            .add_learner(
                req.id,
                RaftNode {
                    addr: req.addr.clone(),
                },
                true,
            )
            .await;
        self.membership_outcome(result, caller, req, |mut c, r| async move {
            c.cluster.add_learner(r).await
        })
        .await
    }

    pub(super) async fn change_membership(
        &self,
        caller: &Caller,
        req: api::ChangeMembershipRequest,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
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
        let result = self
            .router
            .raft()
            .change_membership(change, req.retain)
            .await;
        self.membership_outcome(result, caller, req, |mut c, r| async move {
            c.cluster.change_membership(r).await
        })
        .await
    }

    pub(super) async fn remove_node(
        &self,
        caller: &Caller,
        req: api::RemoveNodeRequest,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        let m = self.router.metrics();
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
        let result = self.router.raft().change_membership(change, false).await;
        self.membership_outcome(result, caller, req, |mut c, r| async move {
            c.cluster.remove_node(r).await
        })
        .await
    }

    pub(super) async fn transfer_leader(
        &self,
        caller: &Caller,
        req: api::TransferLeaderRequest,
    ) -> Result<GrpcResponse<api::TransferLeaderReply>, Status> {
        let m = self.router.metrics();
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
        if let Some(leader) = self.router.leader(caller).await? {
            return leader
                .relay(
                    req,
                    |mut c, r| async move { c.cluster.transfer_leader(r).await },
                )
                .await;
        }
        self.router
            .raft()
            .trigger()
            .transfer_leader(req.to)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(GrpcResponse::new(api::TransferLeaderReply {}))
    }

    pub(super) async fn status(
        &self,
        req: api::StatusRequest,
    ) -> Result<GrpcResponse<api::StatusReply>, Status> {
        let mut reply = self.local_status();
        if req.member_versions {
            self.member_versions(&mut reply.members).await;
        }
        Ok(GrpcResponse::new(reply))
    }

    /// Asks every other member for its build and the cluster versions it runs (see
    /// `crate::upgrade::ask_members`); a member that does not answer keeps them empty.
    async fn member_versions(&self, members: &mut [api::MemberStatus]) {
        let asked = members.iter().map(|m| (m.id, m.addr.clone())).collect();
        let builds =
            crate::upgrade::ask_members(self.router.peers(), &self.state, self.router.id(), asked)
                .await;
        for (m, b) in members.iter_mut().zip(builds) {
            m.version = b.build.unwrap_or_default();
            if let Some(r) = b.runs {
                m.runs_oldest = r.oldest;
                m.runs_newest = r.newest;
            }
        }
    }

    /// Raises the cluster version to the newest every member runs, on the leader.
    pub(super) async fn finalize_upgrade(
        &self,
        caller: &Caller,
        req: api::FinalizeUpgradeRequest,
    ) -> Result<GrpcResponse<api::FinalizeUpgradeReply>, Status> {
        if let Some(leader) = self.router.leader(caller).await? {
            return leader
                .relay(req, |mut c, r| async move {
                    c.cluster.finalize_upgrade(r).await
                })
                .await;
        }
        let done = crate::upgrade::finalize(self.router.raft(), self.router.peers(), &self.state)
            .await
            .map_err(|e| match e {
                crate::upgrade::FinalizeError::Silent(_) => {
                    Status::failed_precondition(e.to_string())
                }
                crate::upgrade::FinalizeError::Raft(_) => Status::unavailable(e.to_string()),
            })?;
        Ok(GrpcResponse::new(api::FinalizeUpgradeReply {
            previous: done.previous,
            cluster_version: done.now,
            index: done.index.unwrap_or(0),
            newest_already: done.newest_already,
        }))
    }

    fn local_status(&self) -> api::StatusReply {
        let m = self.router.metrics();
        let leader_addr = m
            .current_leader
            .and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone())
            })
            .unwrap_or_default();
        api::StatusReply {
            node_id: self.router.id(),
            role: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            committed_index: m.local_committed.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            members: convert::members(&m),
            engine: self.runtime.fingerprint().to_owned(),
            audit: Some(convert::audit_status(&self.state.audit_status())),
            cluster_id: self.router.peers().identity().cluster().unwrap_or_default(),
            guest_memory: Some(self.guest_memory()),
            version: crate::version::RELEASE.to_owned(),
            commit: crate::version::COMMIT.to_owned(),
            cluster_version: self.state.cluster_version(),
            runs_oldest: self.state.runs().oldest,
            runs_newest: self.state.runs().newest,
        }
    }

    pub(super) async fn audit(
        &self,
        caller: &Caller,
    ) -> Result<GrpcResponse<api::AuditReply>, Status> {
        match crate::audit::audit_now(self.router.raft(), self.router.peers()).await {
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
                self.router
                    .leader_of(&e, caller)?
                    .relay(api::AuditRequest {}, |mut c, r| async move {
                        c.cluster.audit(r).await
                    })
                    .await
            }
            Err(crate::audit::AuditError::Raft(e)) => Err(write_error(&e)),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    pub(super) async fn trigger_snapshot(
        &self,
    ) -> Result<GrpcResponse<api::TriggerSnapshotReply>, Status> {
        self.router
            .raft()
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(GrpcResponse::new(api::TriggerSnapshotReply {}))
    }
}

impl Admin {
    /// This node's guest memory: held now, reserved, and the budget.
    pub(super) fn guest_memory(&self) -> crate::pb::api::GuestMemory {
        let reserved = crate::budget::Reservations::of_node(&self.state);
        crate::pb::api::GuestMemory {
            memory_bytes: self
                .state
                .service_metrics()
                .iter()
                .map(|m| m.memory_bytes)
                .sum(),
            code_bytes: reserved.code(),
            reserved_bytes: reserved.total(),
            budget_bytes: self.limits.max_guest_memory.unwrap_or(0),
        }
    }
}
