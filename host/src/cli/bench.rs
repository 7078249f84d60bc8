//! `waft bench`: a closed-loop load generator for waft and, with the same workload, for etcd.
//!
//! N clients share M HTTP/2 connections spread over the endpoints; each client sends one
//! request, waits for the answer, and sends the next. Waft writes go over one `Session`
//! stream per connection by default (every client's commands pipelined on it), or as a unary
//! call each (`--api unary`). Latencies go into HDR histograms (µs,
//! three significant digits), merged at the end. A warm-up runs first and is not measured.

use super::client::Consistency;
use super::connect::{Client, Connector, Output};
use crate::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use crate::pb::etcd::{self, kv_client::KvClient};
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use waft_client::Session;

/// Which system to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// A waft cluster (commands to the kv guest's service).
    Waft,
    /// An etcd cluster, through etcd's v3 gRPC KV API.
    Etcd,
}

/// Arguments of `waft bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The system to load.
    #[arg(long, value_enum, default_value_t = Target::Waft)]
    pub target: Target,
    /// Endpoints (`host:port`, comma-separated); default: `--endpoint`.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Also run the same workload against this etcd cluster and print waft/etcd ratios.
    #[arg(long, value_delimiter = ',', value_name = "ENDPOINTS")]
    pub compare_etcd: Vec<String>,
    /// Concurrent clients (each has one request in flight).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// HTTP/2 connections the clients share (0: with `--api session`, one per endpoint, as a
    /// client library holds; otherwise one per client, up to 64).
    #[arg(long, default_value_t = 0)]
    pub connections: usize,
    /// Measure for this many seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub duration: f64,
    /// Stop after this many measured operations instead (or after 5 s if every request fails).
    #[arg(long)]
    pub count: Option<u64>,
    /// Unmeasured warm-up.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub warmup: f64,
    /// Keys are `key0` .. `key{N-1}`, chosen uniformly.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Bytes per value written.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
    /// Fraction of operations that are reads (0.0: all writes).
    #[arg(long, default_value_t = 0.0)]
    pub read_ratio: f64,
    /// Consistency of reads (etcd: linearizable or serializable, which `stale` maps to).
    #[arg(long, value_enum, default_value_t = Consistency::Linearizable)]
    pub consistency: Consistency,
    /// The waft service to load (it must speak kv's `put KEY VALUE` / `get KEY`).
    #[arg(long, default_value = "kv")]
    pub service: String,
    /// Send every waft request to the leader (asked of the endpoints once, at the start), as a
    /// leader-aware client does, instead of spreading them over the endpoints (followers then
    /// forward writes and linearizable reads). etcd runs are always spread.
    #[arg(long)]
    pub to_leader: bool,
    /// Writes per request: waft gets a SubmitBatch of N commands, etcd a Txn of N puts (to N
    /// different keys). Throughput counts writes; latency is per request. Reads are single.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub batch: u64,
    /// How waft writes travel: `session` pipelines every client's writes over one `Session`
    /// stream per connection (as waft's clients do); `unary` makes a `Submit` (or
    /// `SubmitBatch`) call per request.
    #[arg(long, value_enum, default_value_t = WriteApi::Session)]
    pub api: WriteApi,
}

/// The API `waft bench` writes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WriteApi {
    /// One `Session` stream per connection, shared by its clients.
    Session,
    /// A unary call per request.
    Unary,
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct BenchResult {
    /// What was loaded.
    pub target: Target,
    /// Clients and connections.
    pub clients: usize,
    /// Connections used.
    pub connections: usize,
    /// Measured operations (writes or reads) that succeeded.
    pub ops: u64,
    /// Writes per request.
    pub batch: u64,
    /// Measured operations that failed.
    pub errors: u64,
    /// First error seen, for the report.
    pub first_error: Option<String>,
    /// Measured time.
    pub seconds: f64,
    /// Latencies of successful operations, µs.
    pub latency: Histogram<u64>,
}

impl BenchResult {
    /// Successful operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.seconds.max(1e-9)
    }

    /// A latency percentile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "target": format!("{:?}", self.target).to_lowercase(),
            "clients": self.clients,
            "connections": self.connections,
            "batch": self.batch,
            "ops": self.ops,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": self.seconds,
            "ops_per_sec": self.ops_per_sec(),
            "latency_ms": {
                "p50": self.ms(0.5), "p90": self.ms(0.9), "p99": self.ms(0.99),
                "p999": self.ms(0.999), "max": self.latency.max() as f64 / 1000.0,
                "mean": self.latency.mean() / 1000.0,
            },
        })
    }

    fn text(&self) -> String {
        let mut s = format!(
            "{:<5} {:>4} clients {:>3} conns  {:>9.1} ops/s  p50 {:>7.2} ms  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  max {:>8.2}  ({} ops, {} errors in {:.1} s)",
            format!("{:?}", self.target).to_lowercase(),
            self.clients,
            self.connections,
            self.ops_per_sec(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1000.0,
            self.ops,
            self.errors,
            self.seconds
        );
        if let Some(e) = &self.first_error {
            s.push_str(&format!("\n      first error: {e}"));
        }
        s
    }
}

/// One request kind, ready to send.
enum Conn {
    Waft(WaftClient<super::connect::Conn>),
    /// Writes over a session shared with the connection's other clients, reads unary.
    Session(Session, WaftClient<super::connect::Conn>),
    Etcd(KvClient<Channel>),
}

/// Sends `commands` in one session request; fails unless every one was applied with a reply.
async fn write(session: &Session, commands: Vec<api::SubmitRequest>) -> Result<(), String> {
    for r in session.send(commands).await.map_err(|e| e.to_string())? {
        check_written(r)?;
    }
    Ok(())
}

fn check_written(r: api::SubmitResult) -> Result<(), String> {
    use api::submit_result::Result as R;
    match r.result {
        Some(R::Reply(api::SubmitReply {
            outcome: Some(api::submit_reply::Outcome::Ok(_)),
            ..
        })) => Ok(()),
        Some(R::Failure(f)) => Err(format!("{:?}: {}", tonic::Code::from(f.code), f.message)),
        other => Err(format!("a write got {other:?}")),
    }
}

struct Workload {
    keys: u64,
    value: String,
    read_ratio: f64,
    consistency: Consistency,
    service: String,
    batch: u64,
}

fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// xorshift64*: enough to pick keys and operations.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

impl Workload {
    /// The command that puts the workload's value at `key`.
    fn put(&self, key: &str) -> api::SubmitRequest {
        api::SubmitRequest {
            service: self.service.clone(),
            payload: format!("put {key} {}", self.value).into_bytes(),
            client_id: 0,
            sequence: 0,
        }
    }

    /// One request; the operations it did.
    async fn one(&self, conn: &mut Conn, rng: &mut u64) -> Result<u64, String> {
        let first = next(rng) % self.keys.max(1);
        let read = (next(rng) % 1_000_000) as f64 / 1_000_000.0 < self.read_ratio;
        if !read && self.batch > 1 {
            // Consecutive keys: distinct within the request (etcd refuses a Txn that writes a
            // key twice).
            let keys = (0..self.batch).map(|j| format!("key{}", (first + j) % self.keys.max(1)));
            self.write_batch(conn, keys).await?;
            return Ok(self.batch);
        }
        let key = format!("key{first}");
        match conn {
            Conn::Session(s, _) if !read => {
                write(s, vec![self.put(&key)]).await?;
                Ok(1)
            }
            Conn::Waft(c) => self.unary(c, read, key).await,
            Conn::Session(_, c) => self.unary(c, read, key).await,
            Conn::Etcd(c) => {
                if read {
                    c.range(etcd::RangeRequest {
                        key: key.into_bytes(),
                        serializable: self.consistency == Consistency::Stale,
                        ..Default::default()
                    })
                    .await
                    .map_err(status_text)?;
                } else {
                    c.put(etcd::PutRequest {
                        key: key.into_bytes(),
                        value: self.value.clone().into_bytes(),
                        ..Default::default()
                    })
                    .await
                    .map_err(status_text)?;
                }
                Ok(1)
            }
        }
    }

    /// A unary read or write.
    async fn unary(
        &self,
        c: &mut WaftClient<super::connect::Conn>,
        read: bool,
        key: String,
    ) -> Result<u64, String> {
        if read {
            let consistency = match self.consistency {
                Consistency::Linearizable => api::Consistency::Linearizable,
                Consistency::Lease => api::Consistency::Lease,
                Consistency::Stale => api::Consistency::Stale,
            };
            c.query(api::QueryRequest {
                service: self.service.clone(),
                payload: format!("get {key}").into_bytes(),
                consistency: consistency as i32,
            })
            .await
            .map_err(status_text)?;
            // "key not found" is an answer, not an error.
            Ok(1)
        } else {
            let r = c
                .submit(self.put(&key))
                .await
                .map_err(status_text)?
                .into_inner();
            match r.outcome {
                Some(api::submit_reply::Outcome::Ok(_)) => Ok(1),
                other => Err(format!("the guest answered {other:?}")),
            }
        }
    }

    async fn write_batch(
        &self,
        conn: &mut Conn,
        keys: impl Iterator<Item = String>,
    ) -> Result<(), String> {
        match conn {
            Conn::Session(s, _) => write(s, keys.map(|k| self.put(&k)).collect()).await,
            Conn::Waft(c) => {
                let commands = keys.map(|key| self.put(&key)).collect();
                let results = c
                    .submit_batch(api::SubmitBatchRequest { commands })
                    .await
                    .map_err(status_text)?
                    .into_inner()
                    .results;
                for r in results {
                    check_written(r)?;
                }
                Ok(())
            }
            Conn::Etcd(c) => {
                let success = keys
                    .map(|key| etcd::RequestOp {
                        request: Some(etcd::request_op::Request::RequestPut(etcd::PutRequest {
                            key: key.into_bytes(),
                            value: self.value.clone().into_bytes(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                c.txn(etcd::TxnRequest {
                    success,
                    ..Default::default()
                })
                .await
                .map_err(status_text)?;
                Ok(())
            }
        }
    }
}

/// Connects to a node of `target`: waft endpoints take the process's TLS settings, etcd
/// endpoints are plain unless given as `https://` URIs.
async fn connect(connector: &Connector, target: Target, endpoint: &str) -> anyhow::Result<Channel> {
    let e = match target {
        Target::Etcd if !endpoint.contains("://") => {
            Endpoint::from_shared(format!("http://{endpoint}"))?
        }
        _ => connector.endpoint(endpoint)?,
    };
    e.connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach {endpoint}"))
}

/// Runs one measurement against `endpoints`.
pub async fn run_bench(
    connector: &Connector,
    target: Target,
    endpoints: &[String],
    args: &BenchArgs,
) -> anyhow::Result<BenchResult> {
    if endpoints.is_empty() {
        bail!("no endpoints");
    }
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let connections = match args.connections {
        0 if target == Target::Waft && args.api == WriteApi::Session => {
            endpoints.len().min(args.clients)
        }
        0 => args.clients.min(64),
        n => n.min(args.clients),
    };
    let mut channels = Vec::with_capacity(connections);
    for i in 0..connections {
        channels.push(connect(connector, target, &endpoints[i % endpoints.len()]).await?);
    }
    let workload = Arc::new(Workload {
        keys: args.keys,
        value: "x".repeat(args.value_size),
        read_ratio: args.read_ratio.clamp(0.0, 1.0),
        consistency: args.consistency,
        service: args.service.clone(),
        batch: args.batch,
    });
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failing = Arc::new(AtomicU64::new(0));
    let limit = args.count;
    // One session per connection, shared by its clients.
    let sessions: Vec<Session> = channels
        .iter()
        .map(|ch| Session::on(WaftClient::new(connector.authorized(ch.clone())), 1))
        .collect();
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let ch = channels[i % connections].clone();
        let mut conn = match target {
            Target::Waft => {
                let client = WaftClient::new(connector.authorized(ch))
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20);
                match args.api {
                    WriteApi::Session => Conn::Session(sessions[i % connections].clone(), client),
                    WriteApi::Unary => Conn::Waft(client),
                }
            }
            Target::Etcd => Conn::Etcd(KvClient::new(ch)),
        };
        let (workload, measuring, stop, done, failing) = (
            workload.clone(),
            measuring.clone(),
            stop.clone(),
            done.clone(),
            failing.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("3 significant digits is valid");
            let (mut errors, mut first_error, mut ops) = (0u64, None, 0u64);
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((i as u64 + 1) << 17);
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = workload.one(&mut conn, &mut rng).await;
                let us = start.elapsed().as_micros() as u64;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match r {
                    Ok(n) => {
                        let _ = hist.record(us.max(1));
                        ops += n;
                        let n = done.fetch_add(n, Ordering::Relaxed) + n;
                        if limit.is_some_and(|l| n >= l) {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        failing.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                        // Do not spin on a dead endpoint.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (hist, errors, first_error, ops)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup.max(0.0))).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let progress = std::io::stderr().is_terminal();
    let deadline = started + Duration::from_secs_f64(args.duration.max(0.1));
    while !stop.load(Ordering::Relaxed) && (limit.is_some() || Instant::now() < deadline) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if done.load(Ordering::Relaxed) == 0
            && failing.load(Ordering::Relaxed) > 0
            && started.elapsed() > Duration::from_secs(5)
        {
            // Every request fails: report that instead of waiting for a count never reached.
            break;
        }
        if progress {
            let t = started.elapsed().as_secs_f64();
            let n = done.load(Ordering::Relaxed);
            eprint!(
                "\r{:?} {:>5.1} s  {n} ops  {:.0} ops/s   ",
                target,
                t,
                n as f64 / t.max(1e-9)
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    if progress {
        eprint!("\r{:60}\r", "");
    }
    let mut latency = Histogram::<u64>::new(3).expect("valid");
    let (mut errors, mut first_error, mut ops) = (0, None, 0);
    for t in tasks {
        let (h, e, f, n) = t.await.context("a client task failed")?;
        latency.add(h).context("merging histograms")?;
        errors += e;
        ops += n;
        if first_error.is_none() {
            first_error = f;
        }
    }
    Ok(BenchResult {
        target,
        clients: args.clients,
        connections,
        ops,
        batch: args.batch,
        errors,
        first_error,
        seconds,
        latency,
    })
}

/// The leader's address, from the first of `endpoints` that knows it.
async fn leader_of(connector: &Connector, endpoints: &[String]) -> anyhow::Result<String> {
    let mut last = anyhow::anyhow!("no endpoints");
    for e in endpoints {
        let asked = async {
            let ch = connect(connector, Target::Waft, e).await?;
            let mut c = ClusterClient::new(connector.authorized(ch));
            let s = c
                .status(api::StatusRequest::default())
                .await
                .map_err(|s| anyhow::anyhow!("{}", status_text(s)))?
                .into_inner();
            anyhow::ensure!(
                s.leader_id.is_some() && !s.leader_addr.is_empty(),
                "{e} knows no leader"
            );
            Ok(s.leader_addr)
        };
        match asked.await {
            Ok(addr) => return Ok(addr),
            Err(err) => last = err,
        }
    }
    Err(last.context("--to-leader: cannot learn the leader"))
}

/// `waft bench`.
pub async fn bench(client: &Client, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let endpoints = if args.endpoints.is_empty() {
        client.endpoints.clone()
    } else {
        args.endpoints.clone()
    };
    let endpoints = if args.to_leader && args.target == Target::Waft {
        vec![leader_of(&client.connector, &endpoints).await?]
    } else {
        endpoints
    };
    let first = run_bench(&client.connector, args.target, &endpoints, args).await?;
    let second = if args.compare_etcd.is_empty() {
        None
    } else {
        Some(run_bench(&client.connector, Target::Etcd, &args.compare_etcd, args).await?)
    };
    let ratio = second.as_ref().map(|etcd| {
        (
            first.ops_per_sec() / etcd.ops_per_sec().max(1e-9),
            first.ms(0.5) / etcd.ms(0.5).max(1e-9),
            first.ms(0.99) / etcd.ms(0.99).max(1e-9),
        )
    });
    match client.output {
        Output::Json => {
            let mut doc = serde_json::json!({
                "workload": {
                    "clients": args.clients, "keys": args.keys, "value_size": args.value_size,
                    "read_ratio": args.read_ratio, "consistency": format!("{:?}", args.consistency).to_lowercase(),
                    "to_leader": args.to_leader, "batch": args.batch,
                    "api": format!("{:?}", args.api).to_lowercase(),
                },
                "results": [first.json()],
            });
            if let Some(e) = &second
                && let Some(results) = doc["results"].as_array_mut()
            {
                results.push(e.json());
            }
            if let Some((t, p50, p99)) = ratio {
                doc["ratio"] =
                    serde_json::json!({"throughput": t, "p50_latency": p50, "p99_latency": p99});
            }
            println!("{doc}");
        }
        Output::Text => {
            println!("{}", first.text());
            if let Some(e) = &second {
                println!("{}", e.text());
            }
            if let Some((t, p50, p99)) = ratio {
                println!(
                    "waft/etcd: throughput {t:.2}x, p50 latency {p50:.2}x, p99 latency {p99:.2}x"
                );
            }
        }
    }
    let failed = first.ops == 0 || second.as_ref().is_some_and(|e| e.ops == 0);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
