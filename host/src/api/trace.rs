//! Request ids and tracing spans that follow a request across forwarding.
//!
//! Every call to the client API (and the etcd endpoint) runs inside a `rpc` span carrying the
//! node, the method, whether a peer forwarded it, and a request id: the caller's `x-request-id`
//! header when it sends one (a printable ASCII string of up to 128 bytes), otherwise one this
//! node makes up. A follower that forwards the call to the leader passes the same id along
//! (see `Router::mark`), so grepping one id in the logs of all nodes shows the request's whole
//! path. The reply carries the id in `x-request-id` and the node that served it (the leader,
//! for a forwarded write) in `waft-served-by`.
//!
//! Raft traffic between nodes gets no span: it is not a client's request, and there is a lot
//! of it. Ids are local observations: they never reach the log or a guest.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tonic::codegen::http;
use tracing::Instrument;

/// The request id header, in requests and replies.
pub const REQUEST_ID: &str = "x-request-id";

/// The header that marks a forwarded call; its value is the forwarder's cluster id.
pub(super) const FORWARDED: &str = "waft-forwarded";
/// The reply header naming the node whose handler served the call.
pub const SERVED_BY: &str = "waft-served-by";

/// The longest request id taken from a caller.
const MAX_ID: usize = 128;

/// The caller's request id, if it is one we keep.
pub(crate) fn request_id(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_ID)
}

/// Upper bounds (seconds) of the request-latency histogram buckets.
pub const RPC_BUCKETS_S: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Different methods counted at most; calls to others (garbage paths) count as `other`.
const MAX_METHODS: usize = 128;

/// Calls of one method.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodStats {
    /// Calls by gRPC status code name (`OK`, `UNAVAILABLE`...).
    pub codes: BTreeMap<String, u64>,
    /// Latency counts per bucket of [`RPC_BUCKETS_S`], then overflow.
    pub buckets: [u64; RPC_BUCKETS_S.len() + 1],
    /// Sum of latencies, seconds.
    pub sum_seconds: f64,
}

/// Client calls served by one node, by method (`waft.v1.Waft/Submit`...): local observations
/// for the metrics endpoint. A call's latency runs until its response headers (for a unary
/// call, the whole handler; for a streamed reply, until it starts).
#[derive(Debug, Default)]
pub struct RpcMetrics {
    methods: std::sync::Mutex<BTreeMap<String, MethodStats>>,
    forwarded_batches: AtomicU64,
    forwarded_commands: AtomicU64,
}

impl RpcMetrics {
    /// Counts one batch of `commands` Submits forwarded to the leader.
    pub(crate) fn forwarded(&self, commands: usize) {
        self.forwarded_batches.fetch_add(1, Ordering::Relaxed);
        self.forwarded_commands
            .fetch_add(commands as u64, Ordering::Relaxed);
    }

    /// (batch calls, commands) this node forwarded to a leader so far.
    pub fn forwarded_counts(&self) -> (u64, u64) {
        (
            self.forwarded_batches.load(Ordering::Relaxed),
            self.forwarded_commands.load(Ordering::Relaxed),
        )
    }

    fn record(&self, method: &str, code: &str, took: std::time::Duration) {
        let mut methods = crate::sync::lock_anyway(&self.methods);
        let key = if methods.contains_key(method) || methods.len() < MAX_METHODS {
            method
        } else {
            "other"
        };
        // Allocate names only the first time they are seen (not on every call).
        if !methods.contains_key(key) {
            methods.insert(key.to_owned(), MethodStats::default());
        }
        let Some(m) = methods.get_mut(key) else {
            return;
        };
        match m.codes.get_mut(code) {
            Some(n) => *n += 1,
            None => {
                m.codes.insert(code.to_owned(), 1);
            }
        }
        let secs = took.as_secs_f64();
        let bucket = RPC_BUCKETS_S
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(RPC_BUCKETS_S.len());
        m.buckets[bucket] += 1;
        m.sum_seconds += secs;
    }

    /// Every method's counters so far.
    pub fn snapshot(&self) -> BTreeMap<String, MethodStats> {
        crate::sync::lock_anyway(&self.methods).clone()
    }
}

/// The name of a gRPC status code, as in the gRPC spec.
fn code_name(code: &str) -> &'static str {
    match code.parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "CANCELLED",
        Ok(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Ok(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Ok(tonic::Code::NotFound) => "NOT_FOUND",
        Ok(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Ok(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Ok(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Ok(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Ok(tonic::Code::Aborted) => "ABORTED",
        Ok(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Ok(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Ok(tonic::Code::Internal) => "INTERNAL",
        Ok(tonic::Code::Unavailable) => "UNAVAILABLE",
        Ok(tonic::Code::DataLoss) => "DATA_LOSS",
        Ok(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// Wraps a gRPC server's services (see [`TraceLayer::new`]).
#[derive(Debug, Clone)]
pub struct TraceLayer {
    node: u64,
    ids: std::sync::Arc<IdSource>,
    metrics: std::sync::Arc<RpcMetrics>,
}

#[derive(Debug)]
struct IdSource {
    prefix: u64,
    next: AtomicU64,
}

impl TraceLayer {
    /// Spans and ids for node `node`'s server. Made-up ids are `NODE-PREFIX-COUNTER` (the prefix
    /// differs between runs of the node, so ids do not repeat after a restart).
    pub fn new(node: u64) -> TraceLayer {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        TraceLayer {
            node,
            ids: std::sync::Arc::new(IdSource {
                prefix: started ^ (u64::from(std::process::id()) << 32),
                next: AtomicU64::new(1),
            }),
            metrics: std::sync::Arc::default(),
        }
    }

    /// The call counters of every server this layer wraps.
    pub fn metrics(&self) -> std::sync::Arc<RpcMetrics> {
        self.metrics.clone()
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service wrapped by [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
    layer: TraceLayer,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if path.starts_with("/waft.raft.") {
            return Box::pin(self.inner.call(req));
        }
        let method = path.rsplit('/').next().unwrap_or(path).to_owned();
        let full = path.trim_start_matches('/').to_owned();
        let metrics = self.layer.metrics.clone();
        let started = std::time::Instant::now();
        let id = match request_id(req.headers()) {
            Some(id) => id.to_owned(),
            None => {
                let n = self.layer.ids.next.fetch_add(1, Ordering::Relaxed);
                let id = format!("{}-{:x}-{n}", self.layer.node, self.layer.ids.prefix);
                if let Ok(v) = http::HeaderValue::from_str(&id) {
                    req.headers_mut().insert(REQUEST_ID, v);
                }
                id
            }
        };
        let forwarded = req.headers().contains_key(FORWARDED);
        let node = self.layer.node;
        let span = tracing::info_span!("rpc", node, %method, request_id = %id, forwarded);
        let fut = self.inner.call(req).instrument(span);
        Box::pin(async move {
            let mut resp = fut.await?;
            let headers = resp.headers_mut();
            // A handler's error comes back as a trailers-only reply: the status is a header.
            let code = headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map_or("OK", code_name);
            metrics.record(&full, code, started.elapsed());
            // A forwarded call's reply already names the leader and carries its id.
            if !headers.contains_key(REQUEST_ID)
                && let Ok(v) = http::HeaderValue::from_str(&id)
            {
                headers.insert(REQUEST_ID, v);
            }
            if !headers.contains_key(SERVED_BY) {
                headers.insert(SERVED_BY, http::HeaderValue::from(node));
            }
            Ok(resp)
        })
    }
}
