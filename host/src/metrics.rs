//! Prometheus metrics: a text exposition of what one node knows, served over plain HTTP on its
//! own listener (`waft node --metrics-listen ADDR`, path `/metrics`).
//!
//! Everything here is a local observation (timings, counters, Raft progress); none of it is
//! replicated or reaches a guest.

use crate::Raft;
use crate::api::trace::{RPC_BUCKETS_S, RpcMetrics};
use crate::raft::rtt::{PeerRtt, RTT_BUCKETS_S};
use crate::storage::{APPLY_BUCKETS_US, LogMemory, StateHandle};
use crate::types::TypeConfig;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use std::sync::Arc;
use tokio::net::TcpListener;

/// One number of a service, for a per-service metric.
type ServiceValue = fn(&crate::storage::ServiceMetrics) -> f64;

/// A sample's labels, in order.
type Labels = Vec<(&'static str, String)>;

/// What one node's metrics are read from.
#[derive(Clone, Debug)]
pub struct Sources {
    pub raft: Raft,
    pub state: StateHandle,
    pub rpc: Arc<RpcMetrics>,
    pub rtt: Arc<PeerRtt>,
    /// The WAL's entries in memory (none with redb).
    pub log: Option<LogMemory>,
    /// The node's guest memory budget in bytes (`--max-guest-memory`), if it has one.
    pub guest_memory_budget: Option<u64>,
}

/// The metrics of one node in Prometheus' text format (version 0.0.4), written by the
/// `prometheus-client` library from what [`Sources`] hold at the time of the call.
pub fn render(sources: &Sources) -> Result<String, std::fmt::Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Node(sources.clone())));
    let mut out = String::with_capacity(16 * 1024);
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The node's metrics as a collector: read on every scrape, nothing kept between them.
#[derive(Debug)]
struct Node(Sources);

impl Collector for Node {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        let Sources {
            raft,
            state,
            rpc,
            rtt,
            log,
            guest_memory_budget,
        } = &self.0;
        use openraft::async_runtime::WatchReceiver;
        let m: openraft::RaftMetrics<TypeConfig> = raft.metrics().borrow_watched().clone();
        let mut out = Exposition(encoder);
        raft_metrics(&mut out, &m)?;
        service_metrics(&mut out, state)?;
        rpc_metrics(&mut out, rpc)?;
        rtt_metrics(&mut out, rtt)?;
        node_metrics(&mut out, state, log.as_ref())?;
        budget_metrics(&mut out, state, *guest_memory_budget)?;
        audit_metrics(&mut out, state)?;
        process_metrics(&mut out)
    }
}

/// What a family's samples count or measure.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A count that only grows; its name ends in `_total` (the library writes the suffix).
    Counter,
}

/// One histogram's samples: its labels, the upper bounds of its buckets, the count in each
/// bucket (not cumulative) followed by the count above the last bound, and the sum.
struct Histogram<'a> {
    labels: Labels,
    bounds: &'a [f64],
    buckets: &'a [u64],
    sum: f64,
}

/// The exposition being written, one metric family at a time.
struct Exposition<'a>(DescriptorEncoder<'a>);

impl Exposition<'_> {
    /// A family of samples, each with its labels (none for a family of one).
    fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        samples: Vec<(Labels, f64)>,
    ) -> std::fmt::Result {
        let (base, metric_type) = match kind {
            Kind::Gauge => (name, MetricType::Gauge),
            Kind::Counter => (
                name.strip_suffix("_total").ok_or(std::fmt::Error)?,
                MetricType::Counter,
            ),
        };
        let mut family = self.0.encode_descriptor(base, help, None, metric_type)?;
        for (labels, v) in samples {
            let mut sample = family.encode_family(&labels)?;
            match kind {
                Kind::Gauge => sample.encode_gauge(&v)?,
                Kind::Counter => sample.encode_counter::<NoLabelSet, f64, f64>(&v, None)?,
            }
        }
        Ok(())
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, help: &str, kind: Kind, v: f64) -> std::fmt::Result {
        self.family(name, help, kind, vec![(Labels::new(), v)])
    }

    /// A family of histograms.
    fn histograms(&mut self, name: &str, help: &str, all: Vec<Histogram>) -> std::fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for h in all {
            let mut buckets: Vec<(f64, u64)> = h
                .bounds
                .iter()
                .copied()
                .zip(h.buckets.iter().copied())
                .collect();
            let above = h.buckets.get(h.bounds.len()).copied().unwrap_or(0);
            buckets.push((f64::INFINITY, above));
            let count = buckets.iter().map(|(_, n)| n).sum();
            family
                .encode_family(&h.labels)?
                .encode_histogram::<NoLabelSet>(h.sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// Raft's view: role, term, leader, indexes, each peer's lag.
fn raft_metrics(out: &mut Exposition, m: &openraft::RaftMetrics<TypeConfig>) -> std::fmt::Result {
    let role = format!("{:?}", m.state).to_lowercase();
    out.family(
        "waft_raft_role",
        "1 for this node's current Raft role.",
        Kind::Gauge,
        ["leader", "follower", "candidate", "learner", "shutdown"]
            .iter()
            .map(|r| {
                (
                    vec![("role", (*r).to_owned())],
                    f64::from(u8::from(role == *r)),
                )
            })
            .collect(),
    )?;
    for (name, help, v) in [
        ("waft_raft_term", "Current term.", m.current_term as f64),
        (
            "waft_raft_leader_id",
            "The leader this node knows of (-1: none).",
            m.current_leader.map_or(-1.0, |l| l as f64),
        ),
        (
            "waft_raft_last_log_index",
            "Index of the last entry in this node's log.",
            m.last_log_index.unwrap_or(0) as f64,
        ),
        (
            "waft_raft_committed_index",
            "Index this node knows to be committed.",
            m.local_committed.map_or(0, |l| l.index) as f64,
        ),
        (
            "waft_raft_applied_index",
            "Index this node's state machine has applied.",
            m.last_applied.map_or(0, |l| l.index) as f64,
        ),
        (
            "waft_raft_snapshot_index",
            "Index of this node's last snapshot.",
            m.snapshot.map_or(0, |l| l.index) as f64,
        ),
    ] {
        out.single(name, help, Kind::Gauge, v)?;
    }
    let last = m.last_log_index.unwrap_or(0);
    let lag: Vec<(Labels, f64)> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, matched)| {
                    let matched = matched.as_ref().map_or(0, |l| l.index);
                    (
                        vec![("peer", id.to_string())],
                        last.saturating_sub(matched) as f64,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.family(
        "waft_raft_replication_lag_entries",
        "On the leader: entries each peer is behind this node's log.",
        Kind::Gauge,
        lag,
    )
}

/// Each service: version, counts, timers, fuel, memory, code, apply latency.
fn service_metrics(out: &mut Exposition, state: &StateHandle) -> std::fmt::Result {
    let services = state.service_metrics();
    let per = |f: ServiceValue| -> Vec<(Labels, f64)> {
        services
            .iter()
            .map(|m| (vec![("service", m.name.clone())], f(m)))
            .collect()
    };
    let per_service: [(&str, &str, Kind, ServiceValue); 13] = [
        (
            "waft_service_version",
            "Active version of each service.",
            Kind::Gauge,
            |m| f64::from(m.version),
        ),
        (
            "waft_service_applied_total",
            "Commands applied with a reply.",
            Kind::Counter,
            |m| m.stats.applied as f64,
        ),
        (
            "waft_service_rejected_total",
            "Commands the guest rejected.",
            Kind::Counter,
            |m| m.stats.rejected as f64,
        ),
        (
            "waft_service_trapped_total",
            "Commands that trapped and were rolled back.",
            Kind::Counter,
            |m| m.stats.trapped as f64,
        ),
        (
            "waft_service_timers_pending",
            "Pending guest timers (replicated state).",
            Kind::Gauge,
            |m| m.pending_timers as f64,
        ),
        (
            "waft_service_timers_fired_total",
            "Guest timers delivered (fire answered ok).",
            Kind::Counter,
            |m| m.stats.timers_fired as f64,
        ),
        (
            "waft_service_timer_failures_total",
            "Guest timers whose delivery trapped, was refused or went over a cap: dropped.",
            Kind::Counter,
            |m| m.stats.timer_failures as f64,
        ),
        (
            "waft_service_fuel_total",
            "Fuel the guest consumed (all calls, replays included).",
            Kind::Counter,
            |m| m.fuel as f64,
        ),
        (
            "waft_service_recoveries_total",
            "Times the guest was rebuilt after a trap.",
            Kind::Counter,
            |m| m.recoveries as f64,
        ),
        (
            "waft_service_host_faults_total",
            "Guest calls that hit a fault in waft's host code, contained as a trap of the call.",
            Kind::Counter,
            |m| m.host_faults as f64,
        ),
        (
            "waft_service_memory_bytes",
            "Linear memory the service's live instance holds on this node.",
            Kind::Gauge,
            |m| m.memory_bytes as f64,
        ),
        (
            "waft_service_history_bytes",
            "The instance history kept to rebuild the service's guest (base state and journal of calls).",
            Kind::Gauge,
            |m| m.history_bytes as f64,
        ),
        (
            "waft_service_code_bytes",
            "Compiled code of the module the service runs (shared by the services and versions running the same module).",
            Kind::Gauge,
            |m| m.code_bytes as f64,
        ),
    ];
    for (name, help, kind, f) in per_service {
        out.family(name, help, kind, per(f))?;
    }
    let bounds: Vec<f64> = APPLY_BUCKETS_US.iter().map(|b| *b as f64 / 1e6).collect();
    out.histograms(
        "waft_service_apply_seconds",
        "Time to apply one command in the guest.",
        services
            .iter()
            .map(|m| Histogram {
                labels: vec![("service", m.name.clone())],
                bounds: &bounds,
                buckets: &m.stats.latency_buckets,
                sum: m.stats.latency_sum_us as f64 / 1e6,
            })
            .collect(),
    )
}

/// The client calls this node served, and what it forwarded to the leader.
fn rpc_metrics(out: &mut Exposition, rpc: &RpcMetrics) -> std::fmt::Result {
    let calls = rpc.snapshot();
    out.family(
        "waft_grpc_requests_total",
        "Client calls served by this node, by method and status code.",
        Kind::Counter,
        calls
            .iter()
            .flat_map(|(method, m)| {
                m.codes.iter().map(move |(code, n)| {
                    (
                        vec![("method", method.to_string()), ("code", code.to_string())],
                        *n as f64,
                    )
                })
            })
            .collect(),
    )?;
    out.histograms(
        "waft_grpc_request_seconds",
        "Time to answer a client call (to the reply's headers).",
        calls
            .iter()
            .map(|(method, m)| Histogram {
                labels: vec![("method", method.to_string())],
                bounds: &RPC_BUCKETS_S,
                buckets: &m.buckets,
                sum: m.sum_seconds,
            })
            .collect(),
    )?;
    let (batches, commands) = rpc.forwarded_counts();
    out.single(
        "waft_forwarded_batches_total",
        "Batches of Submits this follower forwarded to the leader.",
        Kind::Counter,
        batches as f64,
    )?;
    out.single(
        "waft_forwarded_commands_total",
        "Submits this follower forwarded to the leader.",
        Kind::Counter,
        commands as f64,
    )
}

/// Round trips of the Raft messages this node sent as leader.
fn rtt_metrics(out: &mut Exposition, rtt: &PeerRtt) -> std::fmt::Result {
    let (heartbeats, appends) = rtt.read();
    out.histograms(
        "waft_peer_round_trip_seconds",
        "Round trips of the Raft messages this node sent as leader, from the request to its reply (one not answered counts with the time it waited).",
        [("heartbeat", &heartbeats), ("append", &appends)]
            .into_iter()
            .map(|(kind, h)| Histogram {
                labels: vec![("kind", kind.to_owned())],
                bounds: &RTT_BUCKETS_S,
                buckets: &h.buckets,
                sum: h.sum_seconds,
            })
            .collect(),
    )
}

/// What the node's services reserve of its guest memory budget (see [`crate::budget`]).
fn budget_metrics(
    out: &mut Exposition,
    state: &StateHandle,
    budget: Option<u64>,
) -> std::fmt::Result {
    out.single(
        "waft_guest_memory_reserved_bytes",
        "Guest memory this node's services reserve: each one's memory limit and its compiled code.",
        Kind::Gauge,
        crate::budget::Reservations::of_node(state).total() as f64,
    )?;
    out.single(
        "waft_guest_memory_budget_bytes",
        "This node's guest memory budget (--max-guest-memory); 0: no budget.",
        Kind::Gauge,
        budget.unwrap_or(0) as f64,
    )?;
    Ok(())
}

/// The node's own: log memory, watch history, snapshots, compiles.
fn node_metrics(
    out: &mut Exposition,
    state: &StateHandle,
    log: Option<&LogMemory>,
) -> std::fmt::Result {
    let snaps = state.snapshot_stats();
    let (compiles, fetched) = state.compile_stats();
    let (watch_events, watch_bytes) = state.watch_history();
    if let Some(log) = log {
        let (entries, bytes) = log.held();
        out.single(
            "waft_log_memory_entries",
            "Log entries this node holds in memory (the WAL keeps them from the last purge on).",
            Kind::Gauge,
            entries as f64,
        )?;
        out.single(
            "waft_log_memory_bytes",
            "Bytes of the log entries this node holds in memory (their size in the log file).",
            Kind::Gauge,
            bytes as f64,
        )?;
    }
    for (name, help, kind, v) in [
        (
            "waft_watch_history_events",
            "Applied commands held in memory for watchers starting from an earlier index.",
            Kind::Gauge,
            watch_events as f64,
        ),
        (
            "waft_watch_history_bytes",
            "Bytes of payloads and replies in the watch history.",
            Kind::Gauge,
            watch_bytes as f64,
        ),
        (
            "waft_modules_compiled_total",
            "Guest modules this node compiled.",
            Kind::Counter,
            compiles.compiled as f64,
        ),
        (
            "waft_modules_compile_seconds_total",
            "Time this node spent compiling guest modules.",
            Kind::Counter,
            compiles.compile_seconds,
        ),
        (
            "waft_modules_loaded_compiled_total",
            "Guest modules this node loaded from compiled code on disk instead of compiling them.",
            Kind::Counter,
            compiles.loaded as f64,
        ),
        (
            "waft_modules_resident_code_bytes",
            "Compiled code this node holds in memory (modules in use, and recently used ones up to --compiled-cache-mib).",
            Kind::Gauge,
            compiles.resident_code_bytes as f64,
        ),
        (
            "waft_modules_compiled_fetched_total",
            "Guest modules whose compiled code this node fetched from a member (--share-compiled).",
            Kind::Counter,
            fetched as f64,
        ),
        (
            "waft_log_clock_offset_seconds",
            "The log's clock (the last applied entry's timestamp, the leader's wall clock when it proposed it) minus this node's wall clock, as of its last apply: far from 0, wall clocks disagree (timers keep real time; guests' timestamps follow the log's clock).",
            Kind::Gauge,
            state.log_clock_offset_ms() as f64 / 1000.0,
        ),
        (
            "waft_host_faults_total",
            "Guest calls of any kind (applies, queries, deploy checks, verifies) that hit a fault in waft's host code, contained as a trap of the call.",
            Kind::Counter,
            crate::runtime::host_faults() as f64,
        ),
        (
            "waft_snapshot_built_total",
            "Snapshots this node built.",
            Kind::Counter,
            snaps.built as f64,
        ),
        (
            "waft_snapshot_last_built_bytes",
            "Size of the last snapshot built.",
            Kind::Gauge,
            snaps.last_built_bytes as f64,
        ),
        (
            "waft_snapshot_last_build_seconds",
            "Time the last snapshot build took.",
            Kind::Gauge,
            snaps.last_build_seconds,
        ),
        (
            "waft_snapshot_installed_total",
            "Snapshots this node installed (sent by a leader).",
            Kind::Counter,
            snaps.installed as f64,
        ),
        (
            "waft_snapshot_last_installed_bytes",
            "Size of the last snapshot installed.",
            Kind::Gauge,
            snaps.last_installed_bytes as f64,
        ),
        (
            "waft_snapshot_last_install_seconds",
            "Time the last snapshot install took.",
            Kind::Gauge,
            snaps.last_install_seconds,
        ),
    ] {
        out.single(name, help, kind, v)?;
    }
    Ok(())
}

/// Audits and heals: what this node compared, found and rebuilt.
fn audit_metrics(out: &mut Exposition, state: &StateHandle) -> std::fmt::Result {
    let audit = state.audit_status();
    out.single(
        "waft_audit_checks_total",
        "State audits compared with this node's own digest.",
        Kind::Counter,
        audit.checks as f64,
    )?;
    out.single(
        "waft_audit_skipped_total",
        "State audits this node had no digest for.",
        Kind::Counter,
        audit.skipped as f64,
    )?;
    out.single(
        "waft_audit_divergences",
        "State mismatches with the majority (or the leader) kept for status (the most recent 16).",
        Kind::Gauge,
        audit.divergences.len() as f64,
    )?;
    out.single(
        "waft_audit_divergences_total",
        "State mismatches with the majority (or the leader) found since the node started.",
        Kind::Counter,
        audit.divergences_total as f64,
    )?;
    out.single(
        "waft_heals_total",
        "Diverged state rebuilt from a majority replica since the node started.",
        Kind::Counter,
        audit.heals_total as f64,
    )?;
    out.single(
        "waft_heal_failures_total",
        "Heals that could not complete (no majority replica gave the state in time).",
        Kind::Counter,
        audit.heal_failures_total as f64,
    )?;
    out.single(
        "waft_services_unavailable",
        "Services this node refuses to read from: diverged and not rebuilt yet. Above 0 for long needs a person.",
        Kind::Gauge,
        audit.unavailable.len() as f64,
    )?;
    out.single(
        "waft_audit_last_checked_index",
        "Log index of the last audit compared.",
        Kind::Gauge,
        audit.last_checked_index.unwrap_or(0) as f64,
    )?;
    Ok(())
}

/// The process's memory (every node it runs).
fn process_metrics(out: &mut Exposition) -> std::fmt::Result {
    if let Some(rss) = resident_bytes() {
        out.single(
            "process_resident_memory_bytes",
            "Resident memory of the process (every node it runs).",
            Kind::Gauge,
            rss as f64,
        )?;
    }
    if let Some(a) = ALLOCATOR.get().and_then(|read| read()) {
        out.single(
            "waft_allocator_allocated_bytes",
            "Bytes the process has allocated on its heap and not freed (every node it runs).",
            Kind::Gauge,
            a.allocated as f64,
        )?;
        out.single(
            "waft_allocator_resident_bytes",
            "Heap memory the allocator keeps resident: what is allocated, its own slack, and freed pages not returned yet.",
            Kind::Gauge,
            a.resident as f64,
        )?;
    }
    Ok(())
}

/// What the process's allocator holds (see [`set_allocator_stats`]).
#[derive(Clone, Copy, Debug)]
pub struct AllocatorStats {
    /// Bytes allocated and not freed.
    pub allocated: u64,
    /// Bytes the allocator keeps in resident pages (at least `allocated`).
    pub resident: u64,
}

static ALLOCATOR: std::sync::OnceLock<fn() -> Option<AllocatorStats>> = std::sync::OnceLock::new();

/// Lets `/metrics` show the heap: the `waft` binary chooses the allocator and passes a function
/// that reads its statistics (a library user's process may use another allocator, or none).
pub fn set_allocator_stats(read: fn() -> Option<AllocatorStats>) {
    let _ = ALLOCATOR.set(read);
}

/// The process's resident set size, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Serves `GET /metrics` on `listener` (HTTP/1.1, hyper) until the task is dropped. Anything
/// else gets 404. A request whose head does not arrive within 5 s is dropped, and a connection
/// lasts at most a minute.
pub async fn serve(listener: TcpListener, sources: Sources) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let sources = sources.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, sources).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

async fn respond<B>(req: &hyper::Request<B>, sources: Sources) -> hyper::Response<Body> {
    let reply = |status: u16, content_type: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Body::new(body.into()))
            .unwrap_or_else(|_| hyper::Response::new(Body::default()))
    };
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return reply(
            404,
            "text/plain",
            "not found; metrics are at /metrics\n".to_owned(),
        );
    }
    // Reading the state machine takes its lock, which an apply may hold for a while: not on an
    // async worker.
    match tokio::task::spawn_blocking(move || render(&sources)).await {
        Ok(Ok(body)) => reply(200, prometheus_text::CONTENT_TYPE, body),
        Ok(Err(std::fmt::Error)) => reply(
            500,
            "text/plain",
            "rendering the metrics failed\n".to_owned(),
        ),
        Err(e) => reply(
            500,
            "text/plain",
            format!("rendering the metrics failed: {e}\n"),
        ),
    }
}
