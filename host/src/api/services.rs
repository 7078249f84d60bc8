//! The gRPC surface of the client API: `waft.v1.Waft` and `waft.v1.Cluster`. Each method checks
//! the caller's token for the role it needs (the one place that says which role a call needs)
//! and hands the message to its handler; nothing else happens here.

use super::Data;
use super::admin::Admin;
use super::backup::{BackupStream, Backups};
use super::deploy::Deploys;
use super::router::Router;
use super::session::SessionStream;
use super::steps::DeployProgressStream;
use super::watch::{WatchStream, Watches};
use crate::auth::Role;
use crate::pb::api::{self, cluster_server, waft_server};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

/// `waft.v1.Waft`: commands, reads, deploys, watches and the service list.
#[derive(Clone, Debug)]
pub struct WaftService {
    router: Router,
    data: Data,
    deploys: Deploys,
    watches: Watches,
}

impl WaftService {
    pub(super) fn new(router: Router, data: Data, deploys: Deploys, watches: Watches) -> Self {
        WaftService {
            router,
            data,
            deploys,
            watches,
        }
    }
}

#[tonic::async_trait]
impl waft_server::Waft for WaftService {
    async fn submit(
        &self,
        request: GrpcRequest<api::SubmitRequest>,
    ) -> Result<GrpcResponse<api::SubmitReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Client)?;
        self.data.submit(&caller, request.into_inner()).await
    }

    async fn submit_batch(
        &self,
        request: GrpcRequest<api::SubmitBatchRequest>,
    ) -> Result<GrpcResponse<api::SubmitBatchReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Client)?;
        self.data.submit_batch(&caller, request.into_inner()).await
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: GrpcRequest<Streaming<api::SessionRequest>>,
    ) -> Result<GrpcResponse<Self::SessionStream>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Client)?;
        Ok(self.data.open_session(caller, request.into_inner()))
    }

    async fn query(
        &self,
        request: GrpcRequest<api::QueryRequest>,
    ) -> Result<GrpcResponse<api::QueryReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Client)?;
        self.data.query(&caller, request.into_inner()).await
    }

    async fn deploy(
        &self,
        request: GrpcRequest<Streaming<api::DeployChunk>>,
    ) -> Result<GrpcResponse<api::DeployReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.deploys.deploy(&caller, request.into_inner()).await
    }

    type DeployWatchedStream = DeployProgressStream;

    async fn deploy_watched(
        &self,
        request: GrpcRequest<Streaming<api::DeployChunk>>,
    ) -> Result<GrpcResponse<Self::DeployWatchedStream>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.deploys
            .deploy_watched(&caller, request.into_inner())
            .await
    }

    type RollbackWatchedStream = DeployProgressStream;

    async fn rollback_watched(
        &self,
        request: GrpcRequest<api::RollbackRequest>,
    ) -> Result<GrpcResponse<Self::RollbackWatchedStream>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.deploys
            .rollback_watched(&caller, request.into_inner())
            .await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: GrpcRequest<api::WatchRequest>,
    ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        self.router.authorize(request.metadata(), Role::Client)?;
        self.watches.open(request.into_inner())
    }

    async fn rollback(
        &self,
        request: GrpcRequest<api::RollbackRequest>,
    ) -> Result<GrpcResponse<api::DeployReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.deploys.rollback(&caller, request.into_inner()).await
    }

    async fn list_services(
        &self,
        request: GrpcRequest<api::ListServicesRequest>,
    ) -> Result<GrpcResponse<api::ListServicesReply>, Status> {
        self.router.authorize(request.metadata(), Role::Client)?;
        let services = self.data.list_services().await;
        Ok(GrpcResponse::new(api::ListServicesReply { services }))
    }
}

/// `waft.v1.Cluster`: membership, status, audits, snapshots, backups and restores.
#[derive(Clone, Debug)]
pub struct ClusterService {
    router: Router,
    admin: Admin,
    backups: Backups,
}

impl ClusterService {
    pub(super) fn new(router: Router, admin: Admin, backups: Backups) -> Self {
        ClusterService {
            router,
            admin,
            backups,
        }
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    type BackupStream = BackupStream;

    async fn backup(
        &self,
        request: GrpcRequest<api::BackupRequest>,
    ) -> Result<GrpcResponse<Self::BackupStream>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.backups.backup(&caller).await
    }

    async fn restore(
        &self,
        request: GrpcRequest<Streaming<api::BackupChunk>>,
    ) -> Result<GrpcResponse<api::RestoreReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.backups.restore(&caller, request.into_inner()).await
    }

    async fn finalize_upgrade(
        &self,
        request: GrpcRequest<api::FinalizeUpgradeRequest>,
    ) -> Result<GrpcResponse<api::FinalizeUpgradeReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.admin
            .finalize_upgrade(&caller, request.into_inner())
            .await
    }

    async fn init(
        &self,
        request: GrpcRequest<api::InitRequest>,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        self.router.authorize(request.metadata(), Role::Admin)?;
        self.admin.init(request.into_inner()).await
    }

    async fn add_learner(
        &self,
        request: GrpcRequest<api::AddLearnerRequest>,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.admin.add_learner(&caller, request.into_inner()).await
    }

    async fn change_membership(
        &self,
        request: GrpcRequest<api::ChangeMembershipRequest>,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.admin
            .change_membership(&caller, request.into_inner())
            .await
    }

    async fn remove_node(
        &self,
        request: GrpcRequest<api::RemoveNodeRequest>,
    ) -> Result<GrpcResponse<api::MembershipReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.admin.remove_node(&caller, request.into_inner()).await
    }

    async fn transfer_leader(
        &self,
        request: GrpcRequest<api::TransferLeaderRequest>,
    ) -> Result<GrpcResponse<api::TransferLeaderReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.admin
            .transfer_leader(&caller, request.into_inner())
            .await
    }

    async fn status(
        &self,
        request: GrpcRequest<api::StatusRequest>,
    ) -> Result<GrpcResponse<api::StatusReply>, Status> {
        self.router.authorize(request.metadata(), Role::Client)?;
        self.admin.status(request.into_inner()).await
    }

    async fn audit(
        &self,
        request: GrpcRequest<api::AuditRequest>,
    ) -> Result<GrpcResponse<api::AuditReply>, Status> {
        let caller = self.router.authorize(request.metadata(), Role::Admin)?;
        self.admin.audit(&caller).await
    }

    async fn trigger_snapshot(
        &self,
        request: GrpcRequest<api::TriggerSnapshotRequest>,
    ) -> Result<GrpcResponse<api::TriggerSnapshotReply>, Status> {
        self.router.authorize(request.metadata(), Role::Admin)?;
        self.admin.trigger_snapshot().await
    }
}
