//! The router: where a call runs. Every handler that needs the leader asks it, and it is the
//! one way a call travels to another node.
//!
//! A call first becomes a [`Caller`] ([`Router::authorize`]: its token checked for the role
//! the call needs, its request id and deadline taken). Then it finds out where it must run
//! ([`Router::leader`] before anything is proposed, or [`Router::leader_of`] from the error
//! openraft gave a proposal). When another node leads, the call goes there unchanged through
//! [`Leader::relay`] (or, for single `Submit`s, in the follower's batches: [`forward`]):
//! marked as forwarded (never forwarded twice), carrying the caller's token, request id and
//! deadline, and a lost connection becomes a retryable `UNAVAILABLE`.
//!
//! The router knows one leader, this node's group's; Raft groups will make it the place that
//! maps a service to its group's leader.

mod forward;

use super::trace::{self, FORWARDED};
use crate::Raft;
use crate::auth::{Role, Tokens};
use crate::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use crate::raft::NetworkFactory;
use crate::types::{NodeId, Request, Response, TypeConfig};
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::Channel;
use tonic::{Request as GrpcRequest, Status};

/// How long a call waits for an election to produce a leader before answering UNAVAILABLE.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The gRPC deadline header.
const TIMEOUT: &str = "grpc-timeout";

/// An authorized call, as far as routing it goes: its token, request id and deadline (which a
/// forwarded call carries on) and whether it was itself forwarded here (then it is never
/// forwarded again). Only [`Router::authorize`] makes one from a caller's metadata, so a
/// handler that takes a `&Caller` cannot be reached by a call whose token was not checked.
#[derive(Clone, Debug)]
pub struct Caller {
    token: Option<AsciiMetadataValue>,
    request_id: Option<AsciiMetadataValue>,
    deadline: Option<Instant>,
    forwarded: bool,
}

impl Caller {
    /// A call this node makes itself, after its own checks as the leader: never forwarded (if
    /// leadership moved meanwhile, the caller retries).
    pub(super) fn local() -> Caller {
        Caller {
            token: None,
            request_id: None,
            deadline: None,
            forwarded: true,
        }
    }
}

/// A `grpc-timeout` value (digits and a unit: H, M, S, m, u or n) as a duration.
fn parse_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A duration as a `grpc-timeout` value (milliseconds, rounded up; at most 8 digits).
fn timeout_value(left: Duration) -> AsciiMetadataValue {
    let ms = left.as_micros().div_ceil(1000).clamp(1, 99_999_999);
    format!("{ms}m")
        .parse()
        .expect("digits and a unit are ASCII")
}

/// The leader, when it is another node: where a call goes instead of running here.
pub(super) struct Leader {
    addr: String,
    channel: Channel,
    marked: tonic::metadata::MetadataMap,
}

/// Clients of the leader's two services, over one channel.
pub struct Clients {
    pub(super) waft: WaftClient<Channel>,
    pub(super) cluster: ClusterClient<Channel>,
}

/// Where this node's calls run: the leader lookup, relaying to it, the follower's batches of
/// `Submit`s for it, and what a forwarded call carries.
#[derive(Clone)]
pub struct Router {
    id: NodeId,
    raft: Raft,
    peers: NetworkFactory,
    tokens: Arc<Tokens>,
    rpc: Arc<trace::RpcMetrics>,
    forwarder: Arc<forward::Forwarder>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Leader {
    /// The leader's address.
    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    /// Makes `call` on the leader with `msg`, marked as forwarded; a failure of the connection
    /// (not a status the leader sent) becomes `UNAVAILABLE`.
    pub(super) async fn relay<T, R, F, Fut>(self, msg: T, call: F) -> Result<R, Status>
    where
        F: FnOnce(Clients, GrpcRequest<T>) -> Fut,
        Fut: Future<Output = Result<R, Status>>,
    {
        let mut req = GrpcRequest::new(msg);
        *req.metadata_mut() = self.marked;
        let clients = Clients {
            waft: WaftClient::new(self.channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            cluster: ClusterClient::new(self.channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        };
        call(clients, req)
            .await
            .map_err(|s| relay_failure(&self.addr, s))
    }
}

/// A forwarded call that failed here, in the connection to the leader (it went away, the
/// connection dropped), rather than with a status the leader sent: UNAVAILABLE, which clients
/// retry, instead of the INTERNAL or UNKNOWN the transport reports. A write may or may not have
/// been applied; a retry with the same client session applies it at most once.
pub(super) fn relay_failure(leader: &str, status: Status) -> Status {
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

pub(super) fn no_leader() -> Status {
    Status::unavailable("no leader is known yet (an election may be in progress); retry shortly")
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

/// Maps a failed write to a status (a refused membership change is the caller's to fix).
pub(super) fn write_error(e: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(m)) => {
            Status::failed_precondition(m.to_string())
        }
        other => Status::unavailable(other.to_string()),
    }
}

impl Router {
    /// The router of node `id`, checking callers' tokens against `tokens` and counting the
    /// commands it forwards in `rpc`.
    pub fn new(
        id: NodeId,
        raft: Raft,
        peers: NetworkFactory,
        tokens: Arc<Tokens>,
        rpc: Arc<trace::RpcMetrics>,
    ) -> Router {
        Router {
            id,
            raft,
            peers,
            tokens,
            rpc,
            forwarder: Arc::default(),
        }
    }

    /// This node's id.
    pub(super) fn id(&self) -> NodeId {
        self.id
    }

    /// This node's Raft handle.
    pub(super) fn raft(&self) -> &Raft {
        &self.raft
    }

    /// This node's connections to its peers.
    pub(super) fn peers(&self) -> &NetworkFactory {
        &self.peers
    }

    /// What this node's Raft reports now.
    pub(super) fn metrics(&self) -> openraft::RaftMetrics<TypeConfig> {
        use openraft::async_runtime::WatchReceiver;
        self.raft.metrics().borrow_watched().clone()
    }

    /// Checks the token in a caller's `metadata` for a call that needs `role`; returns the
    /// caller, with what a forwarded call carries on.
    #[allow(clippy::result_large_err)]
    pub fn authorize(&self, metadata: &MetadataMap, role: Role) -> Result<Caller, Status> {
        let deadline = metadata
            .get(TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout)
            .map(|t| Instant::now() + t);
        Ok(Caller {
            token: self.tokens.check(metadata, role)?,
            request_id: metadata.get(trace::REQUEST_ID).cloned(),
            deadline,
            forwarded: metadata.contains_key(FORWARDED),
        })
    }

    /// The metadata of a call this node forwards for `caller`: marked as forwarded (so it is
    /// not forwarded again) with this node's cluster id (so a stranger refuses it), with the
    /// caller's token, request id and what is left of its deadline.
    pub(super) fn mark(&self, caller: &Caller) -> MetadataMap {
        let mut meta = MetadataMap::new();
        if let Some(token) = &caller.token {
            meta.insert(crate::auth::HEADER, token.clone());
        }
        if let Some(id) = &caller.request_id {
            meta.insert(trace::REQUEST_ID, id.clone());
        }
        if let Some(deadline) = caller.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            meta.insert(TIMEOUT, timeout_value(left));
        }
        let value = self
            .peers
            .identity()
            .cluster()
            .and_then(|id| id.parse().ok())
            .unwrap_or(tonic::metadata::MetadataValue::from_static("1"));
        meta.insert(FORWARDED, value);
        meta
    }

    /// The leader at `addr`, to forward `caller`'s call to.
    #[allow(clippy::result_large_err)]
    pub(super) fn leader_at(&self, addr: String, caller: &Caller) -> Result<Leader, Status> {
        let channel = self.peers.channel(&addr).map_err(Status::unavailable)?;
        Ok(Leader {
            addr,
            channel,
            marked: self.mark(caller),
        })
    }

    /// During an election no node knows a leader for a moment (about one election timeout).
    /// Rather than fail the call at once, wait up to [`LEADER_WAIT`] for one to be known; a
    /// request is only proposed after this, so waiting never changes what gets applied.
    pub(super) async fn await_leader(&self) {
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

    /// Where `caller`'s call must run: `None` when this node leads, else the leader. A call
    /// forwarded here that finds this node no longer leading is refused (retryable).
    pub(super) async fn leader(&self, caller: &Caller) -> Result<Option<Leader>, Status> {
        self.await_leader().await;
        let leader = self.raft.current_leader().await.ok_or_else(no_leader)?;
        if leader == self.id {
            return Ok(None);
        }
        if caller.forwarded {
            return Err(Status::unavailable(
                "this node is no longer the leader; retry",
            ));
        }
        let addr = {
            use openraft::async_runtime::WatchReceiver;
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.clone())
        }
        .ok_or_else(no_leader)?;
        self.leader_at(addr, caller).map(Some)
    }

    /// The leader named by an error openraft gave a proposal or read (`ForwardToLeader`), to
    /// forward the call to; any other error is mapped to a status.
    pub(super) fn leader_of<E>(
        &self,
        e: &RaftError<TypeConfig, E>,
        caller: &Caller,
    ) -> Result<Leader, Status>
    where
        E: openraft::TryAsRef<ForwardToLeader<TypeConfig>> + std::error::Error,
    {
        match e.forward_to_leader() {
            Some(f) if caller.forwarded => Err(Status::unavailable(format!(
                "leadership moved while the request was being forwarded (leader now {:?}); retry",
                f.leader_id
            ))),
            Some(ForwardToLeader {
                leader_node: Some(node),
                ..
            }) => self.leader_at(node.addr.clone(), caller),
            Some(_) => Err(no_leader()),
            None => Err(Status::unavailable(e.to_string())),
        }
    }

    /// Proposes `request` on this node, waiting for a leader first. `Err(Leader)`: another
    /// node leads and nothing was proposed here.
    pub(super) async fn write(
        &self,
        request: Request,
        caller: &Caller,
    ) -> Result<Result<(u64, Response), Leader>, Status> {
        self.await_leader().await;
        match self.raft.client_write(request).await {
            Ok(resp) => Ok(Ok((resp.log_id.index, resp.data))),
            Err(e) if e.forward_to_leader().is_some() => self.leader_of(&e, caller).map(Err),
            Err(e) => Err(write_error(&e)),
        }
    }

    /// A client of the `Waft` service of the leader at `addr` (the follower-side batching of
    /// `Submit`s uses it).
    fn waft_client(&self, addr: &str) -> Result<WaftClient<Channel>, Status> {
        let ch = self.peers.channel(addr).map_err(Status::unavailable)?;
        Ok(WaftClient::new(ch)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// Sends `command` to `leader` in this node's next batch for it, and waits for its reply
    /// and the id of the node that served it.
    pub(super) async fn forward_submit(
        &self,
        leader: &Leader,
        caller: &Caller,
        command: api::SubmitRequest,
    ) -> forward::Forwarded {
        self.forwarder
            .submit(self, leader.addr(), caller, command)
            .await
    }

    /// Counts `commands` this node sent to the leader in one call.
    pub(super) fn count_forwarded(&self, commands: usize) {
        self.rpc.forwarded(commands);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_deadline_is_read_in_every_unit_and_passed_on_in_milliseconds() {
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "5 S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(timeout_value(Duration::from_micros(1500)), "2m");
        assert_eq!(timeout_value(Duration::ZERO), "1m");
        assert_eq!(timeout_value(Duration::from_secs(1 << 40)), "99999999m");
    }

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
