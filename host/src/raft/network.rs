//! The Raft network, client side: how this node sends votes, appends, snapshots and leader
//! transfers to its peers over gRPC.
//!
//! A small pool of HTTP/2 connections per peer address ([`NetConfig::connections`], 3 by
//! default), created once and shared by every RPC: each call (a vote, a replication stream, a
//! snapshot, a forwarded client request) takes the next connection in turn. One connection
//! multiplexes everything too, but its frames go through one connection task and one TCP
//! window: a snapshot transfer or a burst of forwarded requests then queues behind (or in
//! front of) the replication stream. Appends use one bidirectional stream per replication session, so the
//! leader pipelines requests instead of waiting for each reply; small ones are coalesced while
//! one is in flight (at most [`NetConfig::append_hold`], see [`super::append_gate`]). Snapshots are sent in chunks
//! from a reader task while the receiver consumes them: the sender never waits for a reply
//! before sending the next chunk.

use crate::pb::{self, raft::raft_client::RaftClient};
use crate::storage::state_machine::Snapshot;
use crate::types::{Node, NodeId, TypeConfig, Vote};
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{
    Backoff, NetBackoff, NetSnapshot, NetStreamAppend, NetTransferLeader, NetVote, RPCOption,
};
use openraft::raft::{
    AppendEntriesRequest, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkFactory};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Settings of the node-to-node network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// How long to wait for a TCP connection to a peer.
    pub connect_timeout: Duration,
    /// Size of one snapshot chunk on the wire.
    pub snapshot_chunk_bytes: usize,
    /// How long a whole snapshot transfer may take before it is abandoned (and retried).
    pub snapshot_deadline: Duration,
    /// Longest wait for the next chunk of a module fetched from a peer before the node tries
    /// another peer.
    pub module_chunk_timeout: Duration,
    /// Largest gRPC message, both ways. Must exceed the largest log entry plus framing.
    pub max_message_bytes: usize,
    /// Peers reached at another address than the one they advertise (NAT, a proxy, or a
    /// fault-injection harness): advertised address -> address to dial.
    pub dial: BTreeMap<String, String>,
    /// TLS for every endpoint of the node and every connection it makes (mutual TLS between
    /// nodes). None: plain TCP.
    pub tls: Option<crate::tls::Tls>,
    /// Connections kept to each peer, used in turn (at least 1).
    pub connections: usize,
    /// Share compiled code between members (`--share-compiled`): a member asked to hold a
    /// new module fetches the code the leader compiled instead of compiling it again, and
    /// serves its own. Members then run machine code another member made, so a node refuses
    /// to start with it unless the nodes authenticate each other with mutual TLS.
    pub share_compiled: bool,
    /// Longest an entry waits for the append in flight to a follower to be answered before it
    /// goes out in a request of its own (see [`super::append_gate`]); zero pipelines every
    /// request at once.
    pub append_hold: Duration,
}

/// [`NetConfig::append_hold`] unless set: a round trip between nodes on one network is well
/// below it.
pub const DEFAULT_APPEND_HOLD: Duration = Duration::from_millis(1);

/// Most connections a node keeps to one peer.
pub const MAX_CONNECTIONS: usize = 16;

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            connect_timeout: Duration::from_secs(2),
            snapshot_chunk_bytes: 1 << 20,
            snapshot_deadline: Duration::from_secs(600),
            module_chunk_timeout: Duration::from_secs(30),
            max_message_bytes: 160 << 20,
            dial: BTreeMap::new(),
            tls: None,
            connections: 3,
            share_compiled: false,
            append_hold: DEFAULT_APPEND_HOLD,
        }
    }
}

/// The connections to one peer address, taken in turn.
#[derive(Debug)]
struct Pool {
    channels: Vec<Channel>,
    next: std::sync::atomic::AtomicUsize,
    /// A connection of its own for bulk transfers (modules), so that Raft's messages never
    /// wait behind their bytes in one connection's window.
    bulk: Channel,
}

impl Pool {
    fn take(&self) -> Channel {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.channels[i % self.channels.len()].clone()
    }
}

/// Creates [`PeerClient`]s, sharing one pool of connections per peer address.
#[derive(Clone)]
pub struct NetworkFactory {
    config: NetConfig,
    identity: Arc<super::Identity>,
    pools: Arc<Mutex<HashMap<String, Arc<Pool>>>>,
    rtt: Arc<super::rtt::PeerRtt>,
}

impl std::fmt::Debug for NetworkFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkFactory").finish_non_exhaustive()
    }
}

impl NetworkFactory {
    /// A factory with the given settings, stamping every message with `identity`'s cluster.
    pub fn new(config: NetConfig, identity: Arc<super::Identity>) -> NetworkFactory {
        NetworkFactory {
            config,
            identity,
            pools: Arc::default(),
            rtt: Arc::default(),
        }
    }

    /// Round trips of the Raft messages sent through this network.
    pub fn rtt(&self) -> &Arc<super::rtt::PeerRtt> {
        &self.rtt
    }

    /// This node's identity.
    pub fn identity(&self) -> &Arc<super::Identity> {
        &self.identity
    }

    /// The network's settings.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// A channel to the node advertised at `addr`: the next connection of its pool, created
    /// (lazily connecting) on first use. A [`NetConfig::dial`] entry for `addr` redirects it.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        Ok(self.pool(addr)?.take())
    }

    /// The connection for bulk transfers to the node advertised at `addr` (see [`Pool`]).
    pub fn bulk_channel(&self, addr: &str) -> Result<Channel, String> {
        Ok(self.pool(addr)?.bulk.clone())
    }

    /// Calls a unary node-to-node RPC (audits, heals) on node `target` at `addr`: `request`
    /// postcard-encoded, stamped with our cluster, answered within `timeout`.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        target: NodeId,
        addr: &str,
        request: &Req,
        timeout: Duration,
        rpc: F,
    ) -> Result<Resp, String>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<pb::raft::RaftMessage>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::raft::RaftMessage>, tonic::Status>>,
    {
        let client = RaftClient::new(self.channel(addr)?)
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes);
        let mut req = tonic::Request::new(pb::encode(request).map_err(|s| s.message().to_owned())?);
        self.identity.stamp(req.metadata_mut(), target);
        req.set_timeout(timeout);
        let reply = rpc(client, req)
            .await
            .map_err(|s| format!("node {target} at {addr}: {}: {}", s.code(), s.message()))?;
        pb::decode(reply.get_ref()).map_err(|s| s.message().to_owned())
    }

    fn pool(&self, addr: &str) -> Result<Arc<Pool>, String> {
        let mut pools = crate::sync::lock_anyway(&self.pools);
        if let Some(p) = pools.get(addr) {
            return Ok(p.clone());
        }
        let target = self.config.dial.get(addr).map_or(addr, String::as_str);
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{target}"))
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?;
        if let Some(tls) = &self.config.tls {
            endpoint = endpoint
                .tls_config(tls.client())
                .map_err(|e| format!("TLS to {addr:?}: {e}"))?;
        }
        let endpoint = endpoint
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // Each lazily connected channel is a connection of its own.
        let n = self.config.connections.clamp(1, MAX_CONNECTIONS);
        let pool = Arc::new(Pool {
            channels: (0..n).map(|_| endpoint.connect_lazy()).collect(),
            next: Default::default(),
            bulk: endpoint.connect_lazy(),
        });
        pools.insert(addr.to_owned(), pool.clone());
        Ok(pool)
    }

    fn client(&self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            pool: self.pool(&node.addr),
            config: self.config.clone(),
            identity: self.identity.clone(),
            failed_streams: 0,
            retry_at: None,
            rtt: self.rtt.clone(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        self.client(target, node)
    }
}

/// The longest wait before reopening a replication stream that failed to open.
const STREAM_RETRY_MAX: Duration = Duration::from_millis(500);

/// The connection to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    pool: Result<Arc<Pool>, String>,
    config: NetConfig,
    identity: Arc<super::Identity>,
    /// Streams in a row that could not be opened, and when the next may try (see
    /// `stream_append`).
    failed_streams: u32,
    retry_at: Option<tokio::time::Instant>,
    rtt: Arc<super::rtt::PeerRtt>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("target", &self.target)
            .field("addr", &self.addr)
            .finish()
    }
}

/// Maps a gRPC failure to openraft's error: connection problems make the peer "unreachable"
/// (openraft backs off), anything else is a network error (retried as usual).
fn rpc_error(target: NodeId, addr: &str, status: &tonic::Status) -> RPCError<TypeConfig> {
    let msg = format!(
        "node {target} at {addr}: {}: {}",
        status.code(),
        status.message()
    );
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::from_string(msg))
        }
        _ => RPCError::Network(NetworkError::from_string(msg)),
    }
}

impl PeerClient {
    /// A client on the next connection to this peer.
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        match &self.pool {
            Ok(pool) => Ok(RaftClient::new(pool.take())
                .max_decoding_message_size(self.config.max_message_bytes)
                .max_encoding_message_size(self.config.max_message_bytes)),
            Err(e) => Err(RPCError::Unreachable(Unreachable::from_string(e.clone()))),
        }
    }

    fn err(&self, status: &tonic::Status) -> RPCError<TypeConfig> {
        rpc_error(self.target, &self.addr, status)
    }

    /// A request for this peer, stamped with our cluster and its node id.
    fn stamped<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        self.identity.stamp(req.metadata_mut(), self.target);
        req
    }

    fn request<T>(&self, msg: T, option: &RPCOption) -> tonic::Request<T> {
        let mut req = self.stamped(msg);
        req.set_timeout(option.hard_ttl());
        req
    }

    async fn unary<Req, Resp, F, Fut>(
        &self,
        req: &Req,
        option: &RPCOption,
        call: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<pb::raft::RaftMessage>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::raft::RaftMessage>, tonic::Status>>,
    {
        let msg = pb::encode(req).map_err(|s| self.err(&s))?;
        let reply = call(self.client()?, self.request(msg, option))
            .await
            .map_err(|s| self.err(&s))?;
        pb::decode(reply.get_ref()).map_err(|s| self.err(&s))
    }
}

impl NetBackoff<TypeConfig> for PeerClient {
    fn backoff(&self) -> Option<Backoff> {
        None
    }
}

impl NetVote<TypeConfig> for PeerClient {
    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, |mut c, r| async move { c.vote(r).await })
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, |mut c, r| async move { c.pre_vote(r).await })
            .await
    }
}

impl NetTransferLeader<TypeConfig> for PeerClient {
    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&req, &option, |mut c, r| async move {
            c.transfer_leader(r).await
        })
        .await
    }
}

impl NetStreamAppend<TypeConfig> for PeerClient {
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>>
            + OptionalSend
            + Unpin
            + 'static,
    {
        async move {
            // openraft backs off only between requests it pulls from `input`; a stream that
            // fails to open (peer down, connection refused) never pulls one, and openraft would
            // retry at once, thousands of times a second, for as long as the peer is down.
            // So the next try waits until a moment set by the failure, later after each
            // failure in a row (at most half a second after it). A deadline, not a sleep per
            // call: heartbeats are streams too, each given one heartbeat interval, and a sleep
            // as long as that would cancel every later heartbeat before it tried, so that a
            // peer back up would never hear one again.
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
            }
            let (target, addr) = (self.target, self.addr.clone());
            // Entries proposed while a request is in flight go out together in the next. An
            // entry that cannot be encoded ends the stream (openraft then retries); it is
            // logged, never skipped, since skipping would leave a gap in the follower's log.
            let gate = Arc::new(super::append_gate::AppendGate::new(
                self.config.append_hold,
                super::rtt::InFlight::new(self.rtt.clone()),
            ));
            let answered = gate.clone();
            let outgoing = futures::stream::unfold((input, gate), |(mut input, gate)| async move {
                gate.ready().await;
                let request = input.next().await?;
                gate.sent(request.entries.is_empty());
                Some((request, (input, gate)))
            })
                .map(move |req| match pb::encode(&req) {
                    Ok(msg) => Some(msg),
                    Err(e) => {
                        tracing::error!(target, error = %e, "cannot encode an append request; ending the stream");
                        None
                    }
                })
                .take_while(|m| futures::future::ready(m.is_some()))
                .filter_map(futures::future::ready);
            let opened = match self.client() {
                Ok(mut client) => client
                    .append(self.stamped(outgoing))
                    .await
                    .map_err(|s| self.err(&s)),
                Err(e) => Err(e),
            };
            let replies = match opened {
                Ok(r) => {
                    self.failed_streams = 0;
                    self.retry_at = None;
                    r.into_inner()
                }
                Err(e) => {
                    self.failed_streams = self.failed_streams.saturating_add(1);
                    let wait = Duration::from_millis(25 << self.failed_streams.min(5))
                        .min(STREAM_RETRY_MAX);
                    self.retry_at = Some(tokio::time::Instant::now() + wait);
                    return Err(e);
                }
            };
            let results = replies.map(move |item| {
                answered.replied();
                let msg = item.map_err(|s| rpc_error(target, &addr, &s))?;
                pb::decode::<StreamAppendResult<TypeConfig>>(&msg).map_err(|s| rpc_error(target, &addr, &s))
            });
            Ok(results.boxed())
        }
        .boxed()
    }
}

impl NetSnapshot<TypeConfig> for PeerClient {
    type SnapshotData = crate::storage::SnapshotFile;

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let net_err = |s: &tonic::Status| -> StreamingError<TypeConfig> {
            match rpc_error(self.target, &self.addr, s) {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                other => StreamingError::Network(NetworkError::from_string(other.to_string())),
            }
        };
        let header = pb::raft::SnapshotHeader {
            format: pb::FORMAT_POSTCARD,
            vote_and_meta: pb::encode(&(&vote, &snapshot.meta))
                .map_err(|s| net_err(&s))?
                .payload,
            size: snapshot.snapshot.size,
        };
        // A reader thread feeds chunks into a small channel while gRPC sends them; the receiver
        // writes them to disk as they come. Nothing waits for a reply until the last chunk.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::raft::SnapshotChunk>(4);
        let chunk = self.config.snapshot_chunk_bytes;
        let mut file = snapshot.snapshot.file;
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use pb::raft::snapshot_chunk::Kind;
            use std::io::{Seek, SeekFrom};
            file.seek(SeekFrom::Start(0))?;
            if tx
                .blocking_send(pb::raft::SnapshotChunk {
                    kind: Some(Kind::Header(header)),
                })
                .is_err()
            {
                return Ok(());
            }
            let mut buf = vec![0u8; chunk];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                let msg = pb::raft::SnapshotChunk {
                    kind: Some(Kind::Data(buf[..n].to_vec())),
                };
                if tx.blocking_send(msg).is_err() {
                    // The RPC ended early (refused or cancelled); its status says why.
                    return Ok(());
                }
            }
        });
        let mut client = self
            .client()
            .map_err(|e| StreamingError::Network(NetworkError::from_string(e.to_string())))?;
        let mut request = self.stamped(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.set_timeout(self.config.snapshot_deadline);
        let send = client.install_snapshot(request);
        let result = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = send => r,
        };
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(StreamingError::Network(NetworkError::from_string(format!(
                    "reading the snapshot file: {e}"
                ))));
            }
            Err(e) => {
                return Err(StreamingError::Network(NetworkError::from_string(
                    e.to_string(),
                )));
            }
        }
        let reply = result.map_err(|s| net_err(&s))?;
        pb::decode(reply.get_ref()).map_err(|s| net_err(&s))
    }
}
