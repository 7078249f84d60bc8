//! An etcd v3 compatible KV endpoint (`waft node --etcd-listen ADDR`): etcd's `KV` gRPC service
//! (Range, Put, DeleteRange, Txn) in front of a guest that implements etcd's semantics
//! (`examples/guests/etcd-kv`, deployed as the service named by `--etcd-service`, "etcd" by
//! default). `etcdctl` and etcd's client libraries work against it unchanged.
//!
//! Each call becomes a waft command or query handed to this node's own data handler (typed
//! messages, in-process; the caller's token checked by the API's router), so it is replicated,
//! forwarded to the leader, limited and retried like any other: writes (puts, deletes and
//! transactions that write) are log entries; a range is a linearizable query, or a stale one
//! when the client asks for a serializable read; a transaction that only reads is a query.
//! The guest answers with etcd's response message and revision; this endpoint adds the header's
//! cluster id, member id and Raft term. Errors keep etcd's gRPC codes and wording.
//!
//! `cluster.rs` serves `Cluster.MemberList` and `Maintenance.Status` (for `etcdctl member list`
//! and `endpoint status`); `lease.rs` the `Lease` service and `watch.rs` the `Watch` service, on
//! the guest's timers and events. Not served: Auth and the other Cluster and Maintenance calls
//! (UNIMPLEMENTED), reads at an older revision (no history is kept: OUT_OF_RANGE, "compacted").
//! A caller's `authorization` header is passed on, so with `--client-token` the endpoint
//! requires the token as waft's own API does (etcd's own auth is not implemented).

mod cluster;
mod lease;
mod watch;
pub use cluster::{API_VERSION, EtcdAdmin};

use crate::Raft;
use crate::api::{Api, Caller};
use crate::auth::Role;
use crate::pb::api as wapi;
use crate::pb::etcd::kv_server::Kv;
use crate::pb::etcd::*;
use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};

/// The etcd KV service of one node.
#[derive(Clone)]
pub struct EtcdKv {
    api: Api,
    raft: Raft,
    identity: Arc<crate::raft::Identity>,
    service: String,
    /// What this node applied: the guest's key-value events, for `Watch`.
    state: crate::storage::StateHandle,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// Maps a guest refusal (`CODE|message`) to the status etcd would send.
fn refusal(text: &str) -> Status {
    let (code, msg) = text.split_once('|').unwrap_or(("Unknown", text));
    let code = match code {
        "InvalidArgument" => Code::InvalidArgument,
        "NotFound" => Code::NotFound,
        "OutOfRange" => Code::OutOfRange,
        "FailedPrecondition" => Code::FailedPrecondition,
        _ => Code::Unknown,
    };
    Status::new(code, msg.to_owned())
}

impl EtcdKv {
    /// The endpoint of the node serving `api`, backed by the guest deployed as `service`.
    pub fn new(
        api: Api,
        raft: Raft,
        identity: Arc<crate::raft::Identity>,
        service: String,
        state: crate::storage::StateHandle,
    ) -> EtcdKv {
        EtcdKv {
            api,
            raft,
            identity,
            service,
            state,
        }
    }

    fn missing(&self, status: Status) -> Status {
        if status.code() == Code::NotFound && status.message().starts_with("no service named") {
            Status::unavailable(format!(
                "etcdserver: waft has no service {:?} to serve the etcd API; deploy \
                 examples/guests/etcd-kv under that name",
                self.service
            ))
        } else {
            status
        }
    }

    /// `request` as a command to the etcd guest, tagged `tag`: the guest's reply.
    async fn write(
        &self,
        caller: &Caller,
        tag: u8,
        request: &impl crate::pb::Message,
    ) -> Result<Vec<u8>, Status> {
        let command = wapi::SubmitRequest {
            service: self.service.clone(),
            payload: crate::pb::tagged(tag, request),
            client_id: 0,
            sequence: 0,
        };
        let reply = self
            .api
            .data()
            .submit(caller, command)
            .await
            .map_err(|s| self.missing(s))?
            .into_inner();
        match reply.outcome {
            Some(wapi::submit_reply::Outcome::Ok(bytes)) => Ok(bytes),
            Some(wapi::submit_reply::Outcome::Rejected(m)) => Err(refusal(&m)),
            Some(wapi::submit_reply::Outcome::Trapped(m)) => Err(Status::internal(format!(
                "etcdserver: the etcd guest trapped: {m}"
            ))),
            None => Err(Status::internal("empty reply from waft")),
        }
    }

    /// `request` as a query of the etcd guest, tagged `tag` (stale when `serializable`): the
    /// guest's reply.
    pub(super) async fn read(
        &self,
        caller: &Caller,
        tag: u8,
        request: &impl crate::pb::Message,
        serializable: bool,
    ) -> Result<Vec<u8>, Status> {
        let consistency = if serializable {
            wapi::Consistency::Stale
        } else {
            wapi::Consistency::Linearizable
        };
        let query = wapi::QueryRequest {
            service: self.service.clone(),
            payload: crate::pb::tagged(tag, request),
            consistency: consistency as i32,
        };
        let reply = self
            .api
            .data()
            .query(caller, query)
            .await
            .map_err(|s| self.missing(s))?
            .into_inner();
        match reply.outcome {
            Some(wapi::query_reply::Outcome::Ok(bytes)) => Ok(bytes),
            Some(wapi::query_reply::Outcome::Rejected(m)) => Err(refusal(&m)),
            Some(wapi::query_reply::Outcome::Trapped(m)) => Err(Status::internal(format!(
                "etcdserver: the etcd guest trapped: {m}"
            ))),
            None => Err(Status::internal("empty reply from waft")),
        }
    }

    /// Checks the token in a caller's `metadata` as the data calls of waft's own API do.
    #[allow(clippy::result_large_err)]
    pub(super) fn authorize(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, Status> {
        self.api.router().authorize(metadata, Role::Client)
    }

    /// A header with this node's cluster id, member id and Raft term.
    pub(super) fn header(&self) -> ResponseHeader {
        ResponseHeader {
            // etcd's ids are 64-bit; ours is 128: its first half names the cluster.
            cluster_id: self
                .identity
                .cluster()
                .and_then(|id| u64::from_str_radix(&id[..16], 16).ok())
                .unwrap_or(0),
            member_id: member_id(self.identity.cluster().as_deref(), self.identity.node()),
            raft_term: self.raft.metrics().borrow_watched().current_term,
            revision: 0,
        }
    }

    /// The guest's response with the header completed.
    fn finish<M: crate::pb::Message + Default>(
        &self,
        bytes: Vec<u8>,
        header: impl FnOnce(&mut M) -> &mut Option<ResponseHeader>,
    ) -> Result<Response<M>, Status> {
        self.complete(bytes, header).map(Response::new)
    }

    /// The guest's response decoded, with the header completed.
    pub(super) fn complete<M: crate::pb::Message + Default>(
        &self,
        bytes: Vec<u8>,
        header: impl FnOnce(&mut M) -> &mut Option<ResponseHeader>,
    ) -> Result<M, Status> {
        let mut msg = M::decode(bytes.as_slice())
            .map_err(|e| Status::internal(format!("the etcd guest's reply is malformed: {e}")))?;
        let h = header(&mut msg).get_or_insert_with(ResponseHeader::default);
        let ours = self.header();
        h.cluster_id = ours.cluster_id;
        h.member_id = ours.member_id;
        h.raft_term = ours.raft_term;
        Ok(msg)
    }
}

/// etcd's member id for a node: never 0 (etcd clients read 0 as "unset"), stable, distinct per
/// node of a cluster. Like etcd, derived by hashing (here the cluster id and the node id).
pub fn member_id(cluster: Option<&str>, node: u64) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(cluster.unwrap_or("").as_bytes())
        .chain_update(node.to_be_bytes())
        .finalize();
    let id = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    id.max(1)
}

/// Whether a transaction only reads (then it is served as a query, off the log).
fn read_only(t: &TxnRequest) -> bool {
    use request_op::Request as Op;
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(Op::RequestRange(_)) => true,
            Some(Op::RequestTxn(nested)) => read_only(nested),
            _ => false,
        })
}

#[tonic::async_trait]
impl Kv for EtcdKv {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let caller = self.authorize(request.metadata())?;
        let r = request.into_inner();
        let bytes = self.read(&caller, b'R', &r, r.serializable).await?;
        self.finish(bytes, |m: &mut RangeResponse| &mut m.header)
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let bytes = self
            .write(
                &self.authorize(request.metadata())?,
                b'P',
                request.get_ref(),
            )
            .await?;
        self.finish(bytes, |m: &mut PutResponse| &mut m.header)
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let bytes = self
            .write(
                &self.authorize(request.metadata())?,
                b'D',
                request.get_ref(),
            )
            .await?;
        self.finish(bytes, |m: &mut DeleteRangeResponse| &mut m.header)
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let bytes = self
            .write(
                &self.authorize(request.metadata())?,
                b'C',
                request.get_ref(),
            )
            .await?;
        self.finish(bytes, |m: &mut CompactionResponse| &mut m.header)
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = self.authorize(request.metadata())?;
        let t = request.into_inner();
        let bytes = if read_only(&t) {
            self.read(&caller, b'T', &t, false).await?
        } else {
            self.write(&caller, b'T', &t).await?
        };
        self.finish(bytes, |m: &mut TxnResponse| &mut m.header)
    }
}
