//! [`Client`]: connections that find and follow the leader, and the calls of `waft.v1.Waft`
//! with retries that never apply a command twice.

use crate::connect::{Bearer, Conn, Tls};
use crate::proto::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use crate::{Error, Session};
use futures::StreamExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Told of a deploy's upload: `None` when it (re)starts, `Some(bytes)` for each chunk sent.
pub type Progress = Arc<dyn Fn(Option<u64>) + Send + Sync>;

/// How to connect: see [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    deploy_timeout: Duration,
    attempts: u32,
    follow_leader: bool,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .field("follow_leader", &self.follow_leader)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Presents `token` with every call (`waft node --token`/`--client-token`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Connects over TLS.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The deadline of each call (default 10 s); a deploy has its own ([`Self::deploy_timeout`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long to wait for a connection to one node (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The deadline of a deploy, upload and compilation included (default 5 minutes).
    pub fn deploy_timeout(mut self, timeout: Duration) -> Self {
        self.deploy_timeout = timeout;
        self
    }

    /// How many times a call is made before giving up on an unavailable cluster (default 10,
    /// about 11 s of pauses: long enough for an election).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Whether to talk to the leader directly once a node names it (default true), rather
    /// than through the node contacted (which forwards writes).
    pub fn follow_leader(mut self, follow: bool) -> Self {
        self.follow_leader = follow;
        self
    }

    /// Connects to the first endpoint that answers (then to the leader it names).
    pub async fn connect(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoint given".to_owned()));
        }
        for e in &self.endpoints {
            crate::connect::endpoint(e, self.tls.as_ref())?;
        }
        let bearer = Bearer::new(
            self.token
                .as_deref()
                .map(crate::connect::bearer)
                .transpose()?,
        );
        let client = Client {
            inner: Arc::new(Inner {
                settings: self,
                bearer,
                current: tokio::sync::Mutex::new(None),
                lanes: Mutex::new(Vec::new()),
            }),
        };
        client.conn().await?;
        Ok(client)
    }
}

/// A client of a waft cluster. Cheap to clone; clones share connections and client sessions.
///
/// Every call has a deadline, and a call the cluster cannot take now (no leader yet, the
/// leader changed, the node went down) is made again on another node, a little later each
/// time. Commands are submitted with an exactly-once client session: one made again after an
/// unknown outcome is applied at most once and answered with its first reply.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: ClientBuilder,
    bearer: Bearer,
    /// The node calls go to (the leader once known), and its address.
    current: tokio::sync::Mutex<Option<(String, Conn)>>,
    /// Client sessions not in use: (id, next sequence number).
    lanes: Mutex<Vec<(u64, u64)>>,
}

/// What the guest did with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the guest's reply.
    Ok(Vec<u8>),
    /// The guest refused it; nothing changed.
    Rejected(String),
    /// The guest trapped (out of fuel or memory, a panic); waft rolled the call back.
    Trapped(String),
}

impl Outcome {
    fn from_submit(o: Option<proto::submit_reply::Outcome>) -> Result<Outcome, Error> {
        use proto::submit_reply::Outcome as O;
        match o {
            Some(O::Ok(b)) => Ok(Outcome::Ok(b)),
            Some(O::Rejected(m)) => Ok(Outcome::Rejected(m)),
            Some(O::Trapped(m)) => Ok(Outcome::Trapped(m)),
            None => Err(empty()),
        }
    }

    /// The reply, or the refusal or trap as an error message.
    pub fn into_result(self) -> Result<Vec<u8>, String> {
        match self {
            Outcome::Ok(b) => Ok(b),
            Outcome::Rejected(m) => Err(format!("rejected: {m}")),
            Outcome::Trapped(m) => Err(format!("trapped: {m}")),
        }
    }
}

fn empty() -> Error {
    Error::Server {
        code: tonic::Code::Internal,
        message: "the node sent an empty reply".to_owned(),
    }
}

/// A submitted command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Its log index.
    pub index: u64,
    /// What the guest did with it.
    pub outcome: Outcome,
}

impl Applied {
    pub(crate) fn from_reply(r: proto::SubmitReply) -> Result<Applied, Error> {
        Ok(Applied {
            index: r.index,
            outcome: Outcome::from_submit(r.outcome)?,
        })
    }
}

/// A query's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The index the answering node had applied.
    pub applied_index: u64,
    /// What the guest answered.
    pub outcome: Outcome,
}

/// How fresh a query's answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Confirmed with a quorum: sees every write acknowledged before the query.
    #[default]
    Linearizable,
    /// The leader's lease, no round trip.
    Lease,
    /// The contacted node's own state; may lag.
    Stale,
}

/// A deploy's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// The module's sha256 (hex).
    pub module_sha256: String,
    /// The log index it took effect at.
    pub index: u64,
    /// The service's version now.
    pub version: u32,
    /// The service already ran this module: nothing changed.
    pub unchanged: bool,
}

impl Client {
    /// A client of the cluster that `endpoints` (`host:port` of any nodes) belong to.
    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            token: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            deploy_timeout: Duration::from_secs(300),
            attempts: 10,
            follow_leader: true,
        }
    }

    /// Connects with the default settings.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client, Error> {
        Client::builder([endpoint.into()]).connect().await
    }

    fn settings(&self) -> &ClientBuilder {
        &self.inner.settings
    }

    pub(crate) fn attempts_setting(&self) -> u32 {
        self.inner.settings.attempts
    }

    /// The address calls go to now.
    pub async fn current_endpoint(&self) -> Option<String> {
        self.inner
            .current
            .lock()
            .await
            .as_ref()
            .map(|(a, _)| a.clone())
    }

    async fn dial(&self, addr: &str) -> Result<Conn, Error> {
        let s = self.settings();
        let channel = crate::connect::connect(addr, s.tls.as_ref(), s.connect_timeout).await?;
        Ok(tonic::service::interceptor::InterceptedService::new(
            channel,
            self.inner.bearer.clone(),
        ))
    }

    /// The connection calls go to: the current one, or the first endpoint that answers (and
    /// then the leader it names, if it names one that answers).
    pub(crate) async fn conn(&self) -> Result<Conn, Error> {
        let mut current = self.inner.current.lock().await;
        if let Some((_, c)) = current.as_ref() {
            return Ok(c.clone());
        }
        let mut last = None;
        for addr in &self.settings().endpoints {
            let c = match self.dial(addr).await {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            // Every connection is proved with a Status call: a node that does not speak this
            // client's protocol (TLS on one side only) is found here, not by the first call.
            let mut req = tonic::Request::new(proto::StatusRequest {});
            req.set_timeout(self.settings().timeout);
            let status = match ClusterClient::new(c.clone()).status(req).await {
                Ok(s) => s.into_inner(),
                // No token or a wrong one: the node is there, and the call itself will say
                // what it needs (a deploy names the cluster token); stay on this node.
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ) =>
                {
                    proto::StatusReply::default()
                }
                Err(s) => {
                    let mut cause = Error::from(s).to_string();
                    if self.settings().tls.is_none() && crate::error::is_mismatch(&cause) {
                        cause.push_str(" (if the node serves TLS, connect with TLS and its CA)");
                    }
                    last = Some(Error::Unreachable {
                        endpoint: addr.clone(),
                        cause,
                    });
                    continue;
                }
            };
            let mut chosen = (addr.clone(), c.clone());
            let leader = status.leader_addr;
            if self.settings().follow_leader
                && !leader.is_empty()
                && leader != *addr
                && let Ok(l) = self.dial(&leader).await
            {
                chosen = (leader, l);
            }
            *current = Some(chosen.clone());
            tracing::debug!(endpoint = %chosen.0, "waft client connected");
            return Ok(chosen.1);
        }
        Err(last.unwrap_or_else(|| Error::Config("no endpoint given".to_owned())))
    }

    /// Forgets the current connection (the next call finds a node again).
    pub(crate) async fn reconnect(&self) {
        *self.inner.current.lock().await = None;
    }

    /// Makes `call` until it succeeds, fails for good, or the attempts run out; a failure that
    /// another node or a moment later may not have (see [`retryable`]) tries again.
    pub(crate) async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut delay = Duration::from_millis(100);
        let attempts = self.settings().attempts;
        for attempt in 1..=attempts {
            let failure = match self.conn().await {
                Ok(c) => match call(c).await {
                    Ok(v) => return Ok(v),
                    Err(s) if retryable(&s) => Error::from(s),
                    Err(s) => return Err(s.into()),
                },
                Err(e) if e.is_retryable() => e,
                Err(e) => return Err(e),
            };
            if attempt == attempts {
                return Err(failure);
            }
            tracing::debug!(error = %failure, attempt, "waft call failed; trying again");
            self.reconnect().await;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        unreachable!("attempts is at least 1")
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.settings().timeout);
        r
    }

    /// A client session (id, next sequence number) that nobody else is using.
    pub(crate) fn take_lane(&self) -> (u64, u64) {
        self.inner
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| (random_id(), 1))
    }

    /// Gives a client session back for the next command.
    pub(crate) fn put_lane(&self, lane: (u64, u64)) {
        self.inner
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(lane);
    }

    /// Submits one command to `service`, exactly once: made again (with the same client
    /// session and sequence number) while the outcome is unknown.
    pub async fn submit(
        &self,
        service: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Applied, Error> {
        let (id, seq) = self.take_lane();
        let request = proto::SubmitRequest {
            service: service.to_owned(),
            payload: payload.into(),
            client_id: id,
            sequence: seq,
        };
        let result = self
            .retrying(|c| {
                let r = self.request(request.clone());
                async move { waft(c).submit(r).await }
            })
            .await;
        // Used up whether or not it was applied: an unknown outcome may still apply it.
        self.put_lane((id, seq + 1));
        Applied::from_reply(result?.into_inner())
    }

    /// Submits `payloads` to `service` as one batch (proposed together, in order): one result
    /// per command. Commands the cluster could not take are sent again, with their numbers.
    pub async fn submit_batch<P>(
        &self,
        service: &str,
        payloads: P,
    ) -> Result<Vec<Result<Applied, Error>>, Error>
    where
        P: IntoIterator,
        P::Item: Into<Vec<u8>>,
    {
        let (id, first) = self.take_lane();
        let commands = crate::session::numbered(service, payloads, id, first);
        let next = first + commands.len() as u64;
        let session = BatchCall(self.clone());
        let result =
            crate::session::send_until_answered(&session, commands, self.settings().attempts).await;
        // Given back only now: one batch in flight per client session.
        self.put_lane((id, next));
        result
    }

    /// A pipelined `Session` stream on the current connection (see [`Session`]).
    pub fn session(&self) -> Session {
        Session::new(self.clone())
    }

    /// Asks `service` `payload` at `consistency`.
    pub async fn query(
        &self,
        service: &str,
        payload: impl Into<Vec<u8>>,
        consistency: Consistency,
    ) -> Result<Answer, Error> {
        let request = proto::QueryRequest {
            service: service.to_owned(),
            payload: payload.into(),
            consistency: match consistency {
                Consistency::Linearizable => proto::Consistency::Linearizable,
                Consistency::Lease => proto::Consistency::Lease,
                Consistency::Stale => proto::Consistency::Stale,
            } as i32,
        };
        let reply = self
            .retrying(|c| {
                let r = self.request(request.clone());
                async move { waft(c).query(r).await }
            })
            .await?
            .into_inner();
        use proto::query_reply::Outcome as O;
        let outcome = match reply.outcome {
            Some(O::Ok(b)) => Outcome::Ok(b),
            Some(O::Rejected(m)) => Outcome::Rejected(m),
            Some(O::Trapped(m)) => Outcome::Trapped(m),
            None => return Err(empty()),
        };
        Ok(Answer {
            applied_index: reply.applied_index,
            outcome,
        })
    }

    /// Deploys the component `module` (a `.wasm`) as `service`, streamed in 1 MiB chunks.
    /// Needs the cluster (admin) token when the cluster has one.
    pub async fn deploy(&self, service: &str, module: &[u8]) -> Result<Deployed, Error> {
        self.deploy_with(
            proto::DeployHeader {
                service: service.to_owned(),
                size: module.len() as u64,
                ..Default::default()
            },
            module,
        )
        .await
    }

    /// Deploys with every setting of the header (a dry run, limits, a forced swap).
    pub async fn deploy_with(
        &self,
        header: proto::DeployHeader,
        module: &[u8],
    ) -> Result<Deployed, Error> {
        let reply = self.deploy_reply(header, module, None).await?;
        Ok(Deployed {
            module_sha256: reply.module_sha256,
            index: reply.index,
            version: reply.version,
            unchanged: reply.unchanged,
        })
    }

    /// Deploys and returns the node's whole reply (a dry run's trial report, the verifier's
    /// findings); `progress` is told the bytes of each chunk as it goes out (it starts again
    /// from zero when the upload is retried).
    pub async fn deploy_reply(
        &self,
        header: proto::DeployHeader,
        module: &[u8],
        progress: Option<Progress>,
    ) -> Result<proto::DeployReply, Error> {
        let chunks = deploy_chunks(header, module);
        let deadline = self.settings().deploy_timeout;
        let reply = self
            .retrying(|c| {
                let progress = progress.clone();
                if let Some(p) = &progress {
                    p(None);
                }
                let outgoing = futures::stream::iter(chunks.clone()).inspect(move |chunk| {
                    if let (Some(p), Some(proto::deploy_chunk::Kind::Data(d))) =
                        (&progress, &chunk.kind)
                    {
                        p(Some(d.len() as u64));
                    }
                });
                let mut r = tonic::Request::new(outgoing);
                r.set_timeout(deadline);
                async move { waft(c).deploy(r).await }
            })
            .await?;
        Ok(reply.into_inner())
    }

    /// The services the cluster runs.
    pub async fn services(&self) -> Result<Vec<proto::ServiceInfo>, Error> {
        Ok(self
            .retrying(|c| {
                let r = self.request(proto::ListServicesRequest {});
                async move { waft(c).list_services(r).await }
            })
            .await?
            .into_inner()
            .services)
    }

    /// The contacted node's view of the cluster.
    pub async fn status(&self) -> Result<proto::StatusReply, Error> {
        Ok(self
            .retrying(|c| {
                let r = self.request(proto::StatusRequest {});
                async move { ClusterClient::new(c).status(r).await }
            })
            .await?
            .into_inner())
    }

    /// The events of `service` (every service if None) from log index `from` (None: from
    /// now on), resumed after the last one seen when the connection breaks (see
    /// [`crate::Watch`]).
    pub fn watch(&self, service: Option<&str>, from: Option<u64>) -> crate::Watch {
        crate::Watch::new(
            self.clone(),
            service.unwrap_or_default().to_owned(),
            None,
            from.unwrap_or(0),
        )
    }

    /// Like [`Client::watch`], for the events guests emit (`waft:fsm@0.2.0`'s `events.emit`)
    /// under topics that start with `topic_prefix` (every topic if empty): each arrives with
    /// its topic in the `Emitted` outcome and its data in `payload`.
    pub fn watch_events(
        &self,
        service: Option<&str>,
        topic_prefix: &str,
        from: Option<u64>,
    ) -> crate::Watch {
        crate::Watch::new(
            self.clone(),
            service.unwrap_or_default().to_owned(),
            Some(topic_prefix.to_owned()),
            from.unwrap_or(0),
        )
    }
}

/// The `Waft` service on a connection.
pub(crate) fn waft(c: Conn) -> WaftClient<Conn> {
    WaftClient::new(c).max_decoding_message_size(64 << 20)
}

/// A deploy upload: the header, then the module in 1 MiB chunks.
pub fn deploy_chunks(header: proto::DeployHeader, module: &[u8]) -> Vec<proto::DeployChunk> {
    use proto::deploy_chunk::Kind;
    std::iter::once(proto::DeployChunk {
        kind: Some(Kind::Header(header)),
    })
    .chain(module.chunks(1 << 20).map(|c| proto::DeployChunk {
        kind: Some(Kind::Data(c.to_vec())),
    }))
    .collect()
}

/// A SubmitBatch as one round of [`crate::session::send_until_answered`].
struct BatchCall(Client);

impl crate::session::Round for BatchCall {
    async fn round(
        &self,
        commands: Vec<proto::SubmitRequest>,
    ) -> Result<Vec<proto::SubmitResult>, Error> {
        let n = commands.len();
        let reply = self
            .0
            .retrying(|c| {
                let r = self.0.request(proto::SubmitBatchRequest {
                    commands: commands.clone(),
                });
                async move { waft(c).submit_batch(r).await }
            })
            .await?
            .into_inner();
        crate::session::check_count(reply.results, n)
    }
}

/// Whether another node or a moment later may answer `s` differently: no leader, a dead
/// connection, a node stopping.
pub(crate) fn retryable(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable => true,
        // A connection that broke under the call.
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal => {
            let m = s.message();
            m.contains("transport error")
                || m.contains("h2 protocol error")
                || m.contains("operation was canceled")
                || m.contains("connection")
        }
        _ => false,
    }
}

/// A random nonzero client session id.
pub(crate) fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}
