//! The connections of a [`crate::Client`]: finding a node that answers and the leader it names,
//! following it, calling again (on another node, a little later) when the cluster cannot take
//! a call now, and the client sessions commands are numbered in. The client, its sessions and
//! its watches all call through a `Pool`; the pool knows none of them.

use crate::Error;
use crate::connect::{Bearer, Conn, Tls};
use crate::proto::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use std::sync::Mutex;
use std::time::Duration;

/// How to connect: see [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    pub(crate) endpoints: Vec<String>,
    pub(crate) tls: Option<Tls>,
    pub(crate) token: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) deploy_timeout: Duration,
    pub(crate) attempts: u32,
    pub(crate) follow_leader: bool,
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
}

#[derive(Debug)]
pub(crate) struct Pool {
    settings: ClientBuilder,
    bearer: Bearer,
    /// The node calls go to (the leader once known), and its address.
    current: tokio::sync::Mutex<Option<(String, Conn)>>,
    /// Client sessions not in use: (id, next sequence number).
    lanes: Mutex<Vec<(u64, u64)>>,
}

impl Pool {
    pub(crate) fn new(settings: ClientBuilder, bearer: Bearer) -> Pool {
        Pool {
            settings,
            bearer,
            current: tokio::sync::Mutex::new(None),
            lanes: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn settings(&self) -> &ClientBuilder {
        &self.settings
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.settings.attempts
    }

    /// The address calls go to now.
    pub async fn current_endpoint(&self) -> Option<String> {
        self.current.lock().await.as_ref().map(|(a, _)| a.clone())
    }

    async fn dial(&self, addr: &str) -> Result<Conn, Error> {
        let s = self.settings();
        let channel = crate::connect::connect(addr, s.tls.as_ref(), s.connect_timeout).await?;
        Ok(tonic::service::interceptor::InterceptedService::new(
            channel,
            self.bearer.clone(),
        ))
    }

    /// The connection calls go to: the current one, or the first endpoint that answers (and
    /// then the leader it names, if it names one that answers).
    pub(crate) async fn conn(&self) -> Result<Conn, Error> {
        let mut current = self.current.lock().await;
        if let Some((_, c)) = current.as_ref() {
            return Ok(c.clone());
        }
        let mut last = None;
        let mut failed: Vec<(String, String)> = Vec::new();
        for addr in &self.settings().endpoints {
            let c = match self.dial(addr).await {
                Ok(c) => c,
                Err(e) => {
                    failed.push((addr.clone(), cause_of(&e)));
                    last = Some(e);
                    continue;
                }
            };
            // Every connection is proved with a Status call: a node that does not speak this
            // client's protocol (TLS on one side only) is found here, not by the first call.
            let mut req = tonic::Request::new(proto::StatusRequest::default());
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
                    failed.push((addr.clone(), cause.clone()));
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
        Err(match (failed.len(), last) {
            (0, _) | (_, None) => Error::Config("no endpoint given".to_owned()),
            (1, Some(e)) => e,
            // Several endpoints, none reachable: name each and why.
            (_, Some(_)) => Error::Unreachable {
                endpoint: failed
                    .iter()
                    .map(|(a, _)| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                cause: failed
                    .iter()
                    .map(|(a, why)| format!("{a}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        })
    }

    /// Forgets the current connection (the next call finds a node again).
    pub(crate) async fn reconnect(&self) {
        *self.current.lock().await = None;
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

    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.settings().timeout);
        r
    }

    /// A client session (id, next sequence number) that nobody else is using.
    pub(crate) fn take_lane(&self) -> (u64, u64) {
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| (random_id(), 1))
    }

    /// Gives a client session back for the next command.
    pub(crate) fn put_lane(&self, lane: (u64, u64)) {
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(lane);
    }
}

/// The `Waft` service on a connection.
pub(crate) fn waft(c: Conn) -> WaftClient<Conn> {
    WaftClient::new(c).max_decoding_message_size(64 << 20)
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

/// Why an endpoint could not be used, without the words that name it.
fn cause_of(e: &Error) -> String {
    match e {
        Error::Unreachable { cause, .. } => cause.clone(),
        other => other.to_string(),
    }
}
