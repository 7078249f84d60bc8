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
use std::fmt::Write as _;
use std::sync::Arc;
use tokio::net::TcpListener;

/// One number of a service, for a per-service metric.
type ServiceValue = fn(&crate::storage::ServiceMetrics) -> f64;

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What one node's metrics are read from.
#[derive(Clone, Debug)]
pub struct Sources {
    pub raft: Raft,
    pub state: StateHandle,
    pub rpc: Arc<RpcMetrics>,
    pub rtt: Arc<PeerRtt>,
    /// The WAL's entries in memory (none with redb).
    pub log: Option<LogMemory>,
}

/// The metrics of one node in Prometheus' text format (version 0.0.4).
pub fn render(sources: &Sources) -> String {
    let Sources {
        raft,
        state,
        rpc,
        rtt,
        log,
    } = sources;
    use openraft::async_runtime::WatchReceiver;
    let m: openraft::RaftMetrics<TypeConfig> = raft.metrics().borrow_watched().clone();
    let mut out = Exposition(String::with_capacity(4096));
    raft_metrics(&mut out, &m);
    service_metrics(&mut out, state);
    rpc_metrics(&mut out, rpc);
    rtt_metrics(&mut out, rtt);
    node_metrics(&mut out, state, log.as_ref());
    audit_metrics(&mut out, state);
    process_metrics(&mut out);
    out.0
}

/// The text exposition being written, one metric family at a time.
struct Exposition(String);

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A family of samples, each with its labels (`{a="b"}`, or empty).
    fn family(&mut self, name: &str, help: &str, kind: &str, samples: Vec<(String, f64)>) {
        self.header(name, help, kind);
        for (labels, v) in samples {
            let _ = writeln!(self.0, "{name}{labels} {v}");
        }
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, help: &str, kind: &str, v: f64) {
        self.family(name, help, kind, vec![(String::new(), v)]);
    }

    /// One histogram's samples under `labels` (`a="b"`): a cumulative count per upper bound in
    /// `bounds` (then `+Inf`, from the overflow count `buckets` ends with), the sum and the count.
    fn histogram(&mut self, name: &str, labels: &str, bounds: &[f64], buckets: &[u64], sum: f64) {
        let mut cumulative = 0;
        for (bound, n) in bounds.iter().zip(buckets) {
            cumulative += n;
            let _ = writeln!(
                self.0,
                "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += buckets.get(bounds.len()).copied().unwrap_or(0);
        let _ = writeln!(
            self.0,
            "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}\n\
             {name}_sum{{{labels}}} {sum}\n\
             {name}_count{{{labels}}} {cumulative}"
        );
    }
}

/// Raft's view: role, term, leader, indexes, each peer's lag.
fn raft_metrics(out: &mut Exposition, m: &openraft::RaftMetrics<TypeConfig>) {
    let role = format!("{:?}", m.state).to_lowercase();
    out.family(
        "waft_raft_role",
        "1 for this node's current Raft role.",
        "gauge",
        ["leader", "follower", "candidate", "learner", "shutdown"]
            .iter()
            .map(|r| (format!("{{role=\"{r}\"}}"), f64::from(u8::from(role == *r))))
            .collect(),
    );
    out.family(
        "waft_raft_term",
        "Current term.",
        "gauge",
        vec![(String::new(), m.current_term as f64)],
    );
    out.family(
        "waft_raft_leader_id",
        "The leader this node knows of (-1: none).",
        "gauge",
        vec![(String::new(), m.current_leader.map_or(-1.0, |l| l as f64))],
    );
    out.family(
        "waft_raft_last_log_index",
        "Index of the last entry in this node's log.",
        "gauge",
        vec![(String::new(), m.last_log_index.unwrap_or(0) as f64)],
    );
    out.family(
        "waft_raft_committed_index",
        "Index this node knows to be committed.",
        "gauge",
        vec![(
            String::new(),
            m.local_committed.map_or(0, |l| l.index) as f64,
        )],
    );
    out.family(
        "waft_raft_applied_index",
        "Index this node's state machine has applied.",
        "gauge",
        vec![(String::new(), m.last_applied.map_or(0, |l| l.index) as f64)],
    );
    out.family(
        "waft_raft_snapshot_index",
        "Index of this node's last snapshot.",
        "gauge",
        vec![(String::new(), m.snapshot.map_or(0, |l| l.index) as f64)],
    );
    let last = m.last_log_index.unwrap_or(0);
    let lag: Vec<(String, f64)> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, matched)| {
                    let matched = matched.as_ref().map_or(0, |l| l.index);
                    (
                        format!("{{peer=\"{id}\"}}"),
                        last.saturating_sub(matched) as f64,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.family(
        "waft_raft_replication_lag_entries",
        "On the leader: entries each peer is behind this node's log.",
        "gauge",
        lag,
    );
}

/// Each service: version, counts, timers, fuel, memory, code, apply latency.
fn service_metrics(out: &mut Exposition, state: &StateHandle) {
    let services = state.service_metrics();
    let per = |f: ServiceValue| -> Vec<(String, f64)> {
        services
            .iter()
            .map(|m| (format!("{{service=\"{}\"}}", escape(&m.name)), f(m)))
            .collect()
    };
    let per_service: [(&str, &str, &str, ServiceValue); 13] = [
        (
            "waft_service_version",
            "Active version of each service.",
            "gauge",
            |m| f64::from(m.version),
        ),
        (
            "waft_service_applied_total",
            "Commands applied with a reply.",
            "counter",
            |m| m.stats.applied as f64,
        ),
        (
            "waft_service_rejected_total",
            "Commands the guest rejected.",
            "counter",
            |m| m.stats.rejected as f64,
        ),
        (
            "waft_service_trapped_total",
            "Commands that trapped and were rolled back.",
            "counter",
            |m| m.stats.trapped as f64,
        ),
        (
            "waft_service_timers_pending",
            "Pending guest timers (replicated state).",
            "gauge",
            |m| m.pending_timers as f64,
        ),
        (
            "waft_service_timers_fired_total",
            "Guest timers delivered (fire answered ok).",
            "counter",
            |m| m.stats.timers_fired as f64,
        ),
        (
            "waft_service_timer_failures_total",
            "Guest timers whose delivery trapped, was refused or went over a cap: dropped.",
            "counter",
            |m| m.stats.timer_failures as f64,
        ),
        (
            "waft_service_fuel_total",
            "Fuel the guest consumed (all calls, replays included).",
            "counter",
            |m| m.fuel as f64,
        ),
        (
            "waft_service_recoveries_total",
            "Times the guest was rebuilt after a trap.",
            "counter",
            |m| m.recoveries as f64,
        ),
        (
            "waft_service_host_faults_total",
            "Guest calls that hit a fault in waft's host code, contained as a trap of the call.",
            "counter",
            |m| m.host_faults as f64,
        ),
        (
            "waft_service_memory_bytes",
            "Linear memory the service's live instance holds on this node.",
            "gauge",
            |m| m.memory_bytes as f64,
        ),
        (
            "waft_service_history_bytes",
            "The instance history kept to rebuild the service's guest (base state and journal of calls).",
            "gauge",
            |m| m.history_bytes as f64,
        ),
        (
            "waft_service_code_bytes",
            "Compiled code of the module the service runs (shared by the services and versions running the same module).",
            "gauge",
            |m| m.code_bytes as f64,
        ),
    ];
    for (name, help, kind, f) in per_service {
        out.family(name, help, kind, per(f));
    }
    out.header(
        "waft_service_apply_seconds",
        "Time to apply one command in the guest.",
        "histogram",
    );
    let bounds: Vec<f64> = APPLY_BUCKETS_US.iter().map(|b| *b as f64 / 1e6).collect();
    for m in &services {
        let s = &m.stats;
        out.histogram(
            "waft_service_apply_seconds",
            &format!("service=\"{}\"", escape(&m.name)),
            &bounds,
            &s.latency_buckets,
            s.latency_sum_us as f64 / 1e6,
        );
    }
}

/// The client calls this node served, and what it forwarded to the leader.
fn rpc_metrics(out: &mut Exposition, rpc: &RpcMetrics) {
    let calls = rpc.snapshot();
    out.header(
        "waft_grpc_requests_total",
        "Client calls served by this node, by method and status code.",
        "counter",
    );
    for (method, m) in &calls {
        for (code, n) in &m.codes {
            let _ = writeln!(
                out.0,
                "waft_grpc_requests_total{{method=\"{}\",code=\"{code}\"}} {n}",
                escape(method)
            );
        }
    }
    out.header(
        "waft_grpc_request_seconds",
        "Time to answer a client call (to the reply's headers).",
        "histogram",
    );
    for (method, m) in &calls {
        out.histogram(
            "waft_grpc_request_seconds",
            &format!("method=\"{}\"", escape(method)),
            &RPC_BUCKETS_S,
            &m.buckets,
            m.sum_seconds,
        );
    }
    let (batches, commands) = rpc.forwarded_counts();
    out.single(
        "waft_forwarded_batches_total",
        "Batches of Submits this follower forwarded to the leader.",
        "counter",
        batches as f64,
    );
    out.single(
        "waft_forwarded_commands_total",
        "Submits this follower forwarded to the leader.",
        "counter",
        commands as f64,
    );
}

/// Round trips of the Raft messages this node sent as leader.
fn rtt_metrics(out: &mut Exposition, rtt: &PeerRtt) {
    out.header(
        "waft_peer_round_trip_seconds",
        "Round trips of the Raft messages this node sent as leader, from the request to its reply (one not answered counts with the time it waited).",
        "histogram",
    );
    let (heartbeats, appends) = rtt.read();
    for (kind, h) in [("heartbeat", heartbeats), ("append", appends)] {
        out.histogram(
            "waft_peer_round_trip_seconds",
            &format!("kind=\"{kind}\""),
            &RTT_BUCKETS_S,
            &h.buckets,
            h.sum_seconds,
        );
    }
}

/// The node's own: log memory, watch history, snapshots, compiles.
fn node_metrics(out: &mut Exposition, state: &StateHandle, log: Option<&LogMemory>) {
    let snaps = state.snapshot_stats();
    let (compiles, fetched) = state.compile_stats();
    let (watch_events, watch_bytes) = state.watch_history();
    if let Some(log) = log {
        let (entries, bytes) = log.held();
        out.single(
            "waft_log_memory_entries",
            "Log entries this node holds in memory (the WAL keeps them from the last purge on).",
            "gauge",
            entries as f64,
        );
        out.single(
            "waft_log_memory_bytes",
            "Bytes of the log entries this node holds in memory (their size in the log file).",
            "gauge",
            bytes as f64,
        );
    }
    for (name, help, kind, v) in [
        (
            "waft_watch_history_events",
            "Applied commands held in memory for watchers starting from an earlier index.",
            "gauge",
            watch_events as f64,
        ),
        (
            "waft_watch_history_bytes",
            "Bytes of payloads and replies in the watch history.",
            "gauge",
            watch_bytes as f64,
        ),
        (
            "waft_modules_compiled_total",
            "Guest modules this node compiled.",
            "counter",
            compiles.compiled as f64,
        ),
        (
            "waft_modules_compile_seconds_total",
            "Time this node spent compiling guest modules.",
            "counter",
            compiles.compile_seconds,
        ),
        (
            "waft_modules_loaded_compiled_total",
            "Guest modules this node loaded from compiled code on disk instead of compiling them.",
            "counter",
            compiles.loaded as f64,
        ),
        (
            "waft_modules_resident_code_bytes",
            "Compiled code this node holds in memory (modules in use, and recently used ones up to --compiled-cache-mib).",
            "gauge",
            compiles.resident_code_bytes as f64,
        ),
        (
            "waft_modules_compiled_fetched_total",
            "Guest modules whose compiled code this node fetched from a member (--share-compiled).",
            "counter",
            fetched as f64,
        ),
        (
            "waft_log_clock_offset_seconds",
            "The log's clock (the last applied entry's timestamp, the leader's wall clock when it proposed it) minus this node's wall clock, as of its last apply: far from 0, wall clocks disagree (timers keep real time; guests' timestamps follow the log's clock).",
            "gauge",
            state.log_clock_offset_ms() as f64 / 1000.0,
        ),
        (
            "waft_host_faults_total",
            "Guest calls of any kind (applies, queries, deploy checks, verifies) that hit a fault in waft's host code, contained as a trap of the call.",
            "counter",
            crate::runtime::host_faults() as f64,
        ),
        (
            "waft_snapshot_built_total",
            "Snapshots this node built.",
            "counter",
            snaps.built as f64,
        ),
        (
            "waft_snapshot_last_built_bytes",
            "Size of the last snapshot built.",
            "gauge",
            snaps.last_built_bytes as f64,
        ),
        (
            "waft_snapshot_last_build_seconds",
            "Time the last snapshot build took.",
            "gauge",
            snaps.last_build_seconds,
        ),
        (
            "waft_snapshot_installed_total",
            "Snapshots this node installed (sent by a leader).",
            "counter",
            snaps.installed as f64,
        ),
        (
            "waft_snapshot_last_installed_bytes",
            "Size of the last snapshot installed.",
            "gauge",
            snaps.last_installed_bytes as f64,
        ),
        (
            "waft_snapshot_last_install_seconds",
            "Time the last snapshot install took.",
            "gauge",
            snaps.last_install_seconds,
        ),
    ] {
        out.single(name, help, kind, v);
    }
}

/// Audits and heals: what this node compared, found and rebuilt.
fn audit_metrics(out: &mut Exposition, state: &StateHandle) {
    let audit = state.audit_status();
    out.single(
        "waft_audit_checks_total",
        "State audits compared with this node's own digest.",
        "counter",
        audit.checks as f64,
    );
    out.single(
        "waft_audit_skipped_total",
        "State audits this node had no digest for.",
        "counter",
        audit.skipped as f64,
    );
    out.single(
        "waft_audit_divergences",
        "State mismatches with the majority (or the leader) kept for status (the most recent 16).",
        "gauge",
        audit.divergences.len() as f64,
    );
    out.single(
        "waft_audit_divergences_total",
        "State mismatches with the majority (or the leader) found since the node started.",
        "counter",
        audit.divergences_total as f64,
    );
    out.single(
        "waft_heals_total",
        "Diverged state rebuilt from a majority replica since the node started.",
        "counter",
        audit.heals_total as f64,
    );
    out.single(
        "waft_heal_failures_total",
        "Heals that could not complete (no majority replica gave the state in time).",
        "counter",
        audit.heal_failures_total as f64,
    );
    out.single(
        "waft_services_unavailable",
        "Services this node refuses to read from: diverged and not rebuilt yet. Above 0 for long needs a person.",
        "gauge",
        audit.unavailable.len() as f64,
    );
    out.single(
        "waft_audit_last_checked_index",
        "Log index of the last audit compared.",
        "gauge",
        audit.last_checked_index.unwrap_or(0) as f64,
    );
}

/// The process's memory (every node it runs).
fn process_metrics(out: &mut Exposition) {
    if let Some(rss) = resident_bytes() {
        out.single(
            "process_resident_memory_bytes",
            "Resident memory of the process (every node it runs).",
            "gauge",
            rss as f64,
        );
    }
    if let Some(a) = ALLOCATOR.get().and_then(|read| read()) {
        out.single(
            "waft_allocator_allocated_bytes",
            "Bytes the process has allocated on its heap and not freed (every node it runs).",
            "gauge",
            a.allocated as f64,
        );
        out.single(
            "waft_allocator_resident_bytes",
            "Heap memory the allocator keeps resident: what is allocated, its own slack, and freed pages not returned yet.",
            "gauge",
            a.resident as f64,
        );
    }
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
        Ok(body) => reply(200, "text/plain; version=0.0.4; charset=utf-8", body),
        Err(e) => reply(
            500,
            "text/plain",
            format!("rendering the metrics failed: {e}\n"),
        ),
    }
}
