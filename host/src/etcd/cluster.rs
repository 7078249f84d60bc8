//! etcd's `Cluster.MemberList` and `Maintenance.Status` on the etcd endpoint: what `etcdctl
//! member list` and `etcdctl endpoint status` (and clients that check a server's version or
//! leader) ask. Answered from this node's view of Raft and of the etcd guest's state; the
//! other Cluster and Maintenance calls stay UNIMPLEMENTED.

use super::{EtcdKv, member_id};
use crate::pb::etcd::cluster_server::Cluster;
use crate::pb::etcd::maintenance_server::Maintenance;
use crate::pb::etcd::*;
use openraft::async_runtime::WatchReceiver;
use tonic::{Request, Response, Status};

/// The etcd API level the endpoint reports as its version (etcdctl and clients read it to
/// decide which calls they may make; this is the API of etcd 3.4 that waft speaks).
pub const API_VERSION: &str = "3.4.0";

/// `Cluster` and `Maintenance` of one node's etcd endpoint.
#[derive(Clone, Debug)]
pub struct EtcdAdmin {
    kv: EtcdKv,
    /// This node's etcd endpoint as a URL (`http://ADDR` or `https://ADDR`).
    client_url: String,
}

impl EtcdAdmin {
    /// The services beside `kv`, which this node serves at `client_url`.
    pub fn new(kv: EtcdKv, client_url: String) -> EtcdAdmin {
        EtcdAdmin { kv, client_url }
    }

    /// The etcd guest's current revision (a serializable count of nothing); 0 if there is no
    /// etcd service yet.
    async fn revision(&self, caller: &crate::api::Caller) -> i64 {
        let probe = RangeRequest {
            key: vec![0],
            count_only: true,
            serializable: true,
            ..Default::default()
        };
        match self.kv.read(caller, b'R', &probe, true).await {
            Ok(bytes) => <RangeResponse as crate::pb::Message>::decode(bytes.as_slice())
                .ok()
                .and_then(|r| r.header)
                .map_or(0, |h| h.revision),
            Err(_) => 0,
        }
    }

    fn header(&self, revision: i64) -> ResponseHeader {
        let mut h = self.kv.header();
        h.revision = revision;
        h
    }
}

#[tonic::async_trait]
impl Cluster for EtcdAdmin {
    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.kv.authorize(request.metadata())?;
        let m = self.kv.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let cluster = self.kv.identity.cluster();
        let me = self.kv.identity.node();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                id: member_id(cluster.as_deref(), *id),
                name: format!("waft-{id}"),
                peer_ur_ls: vec![format!("http://{}", node.addr)],
                // Only this node's etcd address is known here.
                client_ur_ls: if *id == me {
                    vec![self.client_url.clone()]
                } else {
                    Vec::new()
                },
                is_learner: learners.contains(id),
            })
            .collect();
        Ok(Response::new(MemberListResponse {
            // etcd's member list carries no revision either.
            header: Some(self.header(0)),
            members,
        }))
    }
}

#[tonic::async_trait]
impl Maintenance for EtcdAdmin {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let caller = self.kv.authorize(request.metadata())?;
        let revision = self.revision(&caller).await;
        // The etcd guest's state is etcd's database here.
        let services = self.kv.api.data().list_services().await;
        let db = services
            .iter()
            .find(|s| s.name == self.kv.service)
            .map_or(0, |s| s.state_bytes as i64);
        let m = self.kv.raft.metrics().borrow_watched().clone();
        let cluster = self.kv.identity.cluster();
        let me = self.kv.identity.node();
        let mut errors = Vec::new();
        if db == 0 && !services.iter().any(|s| s.name == self.kv.service) {
            errors.push(format!(
                "waft has no service {:?} to serve the etcd API",
                self.kv.service
            ));
        }
        Ok(Response::new(StatusResponse {
            header: Some(self.header(revision)),
            version: API_VERSION.to_owned(),
            db_size: db,
            leader: m
                .current_leader
                .map_or(0, |l| member_id(cluster.as_deref(), l)),
            raft_index: m.local_committed.map_or(0, |l| l.index),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map_or(0, |l| l.index),
            errors,
            db_size_in_use: db,
            is_learner: m
                .membership_config
                .membership()
                .learner_ids()
                .any(|l| l == me),
        }))
    }

    /// A hash of this node's key-value state: the first 32 bits of the sha256 of the etcd
    /// guest's canonical snapshot (etcd hashes its database file; equal stores hash alike
    /// either way, and members that applied the same entries agree).
    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        use sha2::Digest;
        let caller = self.kv.authorize(request.metadata())?;
        let revision = self.revision(&caller).await;
        let state = self
            .kv
            .state
            .service_state(&self.kv.service)
            .await
            .map_err(|e| Status::internal(format!("etcdserver: cannot read the store: {e}")))?
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "etcdserver: waft has no service {:?} to serve the etcd API",
                    self.kv.service
                ))
            })?;
        let digest = sha2::Sha256::digest(&state);
        Ok(Response::new(HashResponse {
            header: Some(self.header(revision)),
            hash: u32::from_be_bytes(digest[..4].try_into().expect("4 bytes")),
        }))
    }
}
