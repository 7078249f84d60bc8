//! `waft bench-watch` and `waft bench-timers`: what watchers and timers cost, measured through
//! etcd's API, so that waft's etcd endpoint (on the etcd-kv guest's events and timers) and a
//! real etcd run the same workload in the same run.
//!
//! - **Watch fan-out**: W watchers (over S streams, spread over the endpoints) on one prefix while
//!   C writers put keys under it as fast as they can: puts/s, events delivered/s (every put
//!   reaches every watcher), delivery latency from put to event, and whether every event arrived.
//! - **Timer lag**: N leases of a few seconds granted over a spread of time, a key on each, while
//!   C writers load the cluster with puts; a watcher sees each key deleted when its lease runs
//!   out. The lag is the time from when the lease was due (its grant asked for, plus its TTL:
//!   an upper bound, since the server starts the TTL when it grants) to the delete event's
//!   arrival. On waft a lease is a guest timer, so this measures timer
//!   delivery; etcd's lessor checks for expired leases every 500 ms.

use super::connect::Output;
use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

use crate::pb::etcd::{
    self, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};

/// Arguments of `waft bench-watch`.
#[derive(Debug, Args)]
pub struct WatchBenchArgs {
    /// waft's etcd endpoints (`--etcd-listen` of each node).
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// A real etcd's endpoints, loaded the same way in the same run (the baseline).
    #[arg(long, value_delimiter = ',')]
    pub compare_etcd: Vec<String>,
    /// Watchers, all on the same prefix.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Watch streams the watchers are spread over (0: one stream per watcher).
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Bytes per value.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
}

/// Arguments of `waft bench-timers`.
#[derive(Debug, Args)]
pub struct TimerBenchArgs {
    /// waft's etcd endpoints (`--etcd-listen` of each node).
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// A real etcd's endpoints, measured the same way in the same run (the baseline).
    #[arg(long, value_delimiter = ',')]
    pub compare_etcd: Vec<String>,
    /// Leases (timers) to measure.
    #[arg(long, default_value_t = 200)]
    pub timers: usize,
    /// Their TTL, seconds (etcd's minimum is 2).
    #[arg(long, default_value_t = 2)]
    pub ttl: i64,
    /// Seconds over which the leases are granted.
    #[arg(long, default_value_t = 5.0)]
    pub spread: f64,
    /// Writers loading the cluster meanwhile (0: idle).
    #[arg(long, default_value_t = 16)]
    pub load: usize,
}

async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    let uri = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach {endpoint}"))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e3
}

/// A prefix watch on `stream`'s connection: `watchers` watchers, each event's arrival reported
/// with the microseconds since `epoch` written in its value.
async fn open_watchers(
    ch: Channel,
    prefix: &[u8],
    watchers: usize,
) -> anyhow::Result<tonic::Streaming<etcd::WatchResponse>> {
    let end = prefix_end(prefix);
    let requests: Vec<etcd::WatchRequest> = (0..watchers)
        .map(|_| etcd::WatchRequest {
            request_union: Some(etcd::watch_request::RequestUnion::CreateRequest(
                etcd::WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: end.clone(),
                    ..Default::default()
                },
            )),
        })
        .collect();
    // The request stream stays open (a closed one ends the watch on some servers).
    let (tx, rx) = tokio::sync::mpsc::channel(watchers.max(1));
    for r in requests {
        tx.send(r).await.expect("room for every request");
    }
    tokio::spawn(async move {
        tx.closed().await;
    });
    let mut stream = WatchClient::new(ch)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut created = 0;
    while created < watchers {
        match stream.message().await? {
            Some(r) if r.created => created += 1,
            Some(_) => {}
            None => anyhow::bail!("the watch stream ended before its watchers were created"),
        }
    }
    Ok(stream)
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One watch fan-out measurement.
struct FanOut {
    target: &'static str,
    puts: u64,
    seconds: f64,
    delivered: u64,
    latency: Histogram<u64>,
}

impl FanOut {
    fn json(&self, watchers: usize) -> serde_json::Value {
        serde_json::json!({
            "target": self.target, "puts": self.puts,
            "puts_per_sec": self.puts as f64 / self.seconds,
            "events_per_sec": self.delivered as f64 / self.seconds,
            "delivered": self.delivered, "expected": self.puts * watchers as u64,
            "p50_ms": ms(&self.latency, 0.5), "p99_ms": ms(&self.latency, 0.99),
        })
    }
}

async fn fan_out(
    target: &'static str,
    endpoints: &[String],
    a: &WatchBenchArgs,
) -> anyhow::Result<FanOut> {
    let prefix = format!("fanout/{target}/{}/", std::process::id()).into_bytes();
    let streams = if a.streams == 0 {
        a.watchers
    } else {
        a.streams.min(a.watchers)
    };
    let mut channels = Vec::new();
    for e in endpoints {
        channels.push(channel(e).await?);
    }
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(std::sync::Mutex::new(histogram()));
    let mut readers = Vec::new();
    for s in 0..streams {
        let n = a.watchers / streams + usize::from(s < a.watchers % streams);
        let mut stream = open_watchers(channels[s % channels.len()].clone(), &prefix, n).await?;
        let (delivered, latency) = (delivered.clone(), latency.clone());
        readers.push(tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                let now = epoch.elapsed().as_micros() as u64;
                {
                    let mut h = crate::sync::lock_anyway(&latency);
                    for e in &r.events {
                        let sent = e
                            .kv
                            .as_ref()
                            .and_then(|kv| kv.value.get(..8))
                            .map_or(now, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                        let _ = h.record(now.saturating_sub(sent).max(1));
                    }
                }
                delivered.fetch_add(r.events.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..a.writers {
        let mut kv = KvClient::new(channels[w % channels.len()].clone());
        let (stop, puts, prefix) = (stop.clone(), puts.clone(), prefix.clone());
        let size = a.value_size.max(8);
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut value = vec![0u8; size];
                value[..8].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_le_bytes());
                let mut key = prefix.clone();
                key.extend_from_slice(format!("{w}/{}", n % 100).as_bytes());
                n += 1;
                if kv
                    .put(etcd::PutRequest {
                        key,
                        value,
                        ..Default::default()
                    })
                    .await
                    .is_ok()
                {
                    puts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let puts = puts.load(Ordering::Relaxed);
    // Let the watchers catch up (at most 10 s), then stop reading.
    let expected = puts * a.watchers as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(channels);
    for r in &readers {
        r.abort();
    }
    for r in readers {
        let _ = r.await;
    }
    let latency = crate::sync::lock_anyway(&latency).clone();
    Ok(FanOut {
        target,
        puts,
        seconds,
        delivered: delivered.load(Ordering::Relaxed),
        latency,
    })
}

fn report(output: Output, name: &str, results: Vec<serde_json::Value>, ratio: serde_json::Value) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"benchmark": name, "results": results, "ratio": ratio})
        ),
        Output::Text => {
            for r in &results {
                println!("{r}");
            }
            if !ratio.is_null() {
                println!("waft/etcd: {ratio}");
            }
        }
    }
}

/// `waft bench-watch`.
pub async fn bench_watch(output: Output, a: &WatchBenchArgs) -> anyhow::Result<ExitCode> {
    let ours = fan_out("waft", &a.etcd, a).await?;
    let theirs = match a.compare_etcd.is_empty() {
        true => None,
        false => Some(fan_out("etcd", &a.compare_etcd, a).await?),
    };
    let ratio = theirs.as_ref().map_or(serde_json::Value::Null, |t| {
        serde_json::json!({
            "events_per_sec": ours.delivered as f64 / ours.seconds / (t.delivered as f64 / t.seconds).max(1e-9),
            "puts_per_sec": ours.puts as f64 / ours.seconds / (t.puts as f64 / t.seconds).max(1e-9),
            "p99_latency": ms(&ours.latency, 0.99) / ms(&t.latency, 0.99).max(1e-9),
        })
    });
    let mut results = vec![ours.json(a.watchers)];
    results.extend(theirs.iter().map(|t| t.json(a.watchers)));
    let complete = ours.delivered >= ours.puts * a.watchers as u64;
    report(output, "watch-fanout", results, ratio);
    Ok(if complete && ours.puts > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One timer lag measurement.
struct Lag {
    target: &'static str,
    timers: usize,
    expired: usize,
    lag: Histogram<u64>,
    load_puts: u64,
}

impl Lag {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "target": self.target, "timers": self.timers, "expired": self.expired,
            "p50_ms": ms(&self.lag, 0.5), "p99_ms": ms(&self.lag, 0.99), "max_ms": ms(&self.lag, 1.0),
            "load_puts": self.load_puts,
        })
    }
}

async fn timer_lag(
    target: &'static str,
    endpoints: &[String],
    a: &TimerBenchArgs,
) -> anyhow::Result<Lag> {
    let prefix = format!("lag/{target}/{}/", std::process::id()).into_bytes();
    let mut channels = Vec::new();
    for e in endpoints {
        channels.push(channel(e).await?);
    }
    let epoch = Instant::now();
    // Keys deleted, with when the delete arrived.
    let mut watch = open_watchers(channels[0].clone(), &prefix, 1).await?;
    let arrivals = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        Vec<u8>,
        u64,
    >::new()));
    let sink = arrivals.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(r)) = watch.message().await {
            let now = epoch.elapsed().as_micros() as u64;
            for e in r.events {
                if e.r#type == etcd::event::EventType::Delete as i32
                    && let Some(kv) = e.kv
                {
                    crate::sync::lock_anyway(&sink).entry(kv.key).or_insert(now);
                }
            }
        }
    });
    // Load.
    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..a.load {
        let mut kv = KvClient::new(channels[w % channels.len()].clone());
        let (stop, puts) = (stop.clone(), puts.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let put = etcd::PutRequest {
                    key: format!("load/{w}/{}", n % 100).into_bytes(),
                    value: vec![b'x'; 64],
                    ..Default::default()
                };
                if kv.put(put).await.is_ok() {
                    puts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Leases, granted evenly over the spread, each with one key.
    let mut due: Vec<(Vec<u8>, u64)> = Vec::new();
    let gap = Duration::from_secs_f64(a.spread / a.timers.max(1) as f64);
    let mut lease = LeaseClient::new(channels[0].clone());
    let mut kv = KvClient::new(channels[0].clone());
    for i in 0..a.timers {
        // Due at most TTL after the grant was asked for (the server starts the TTL when it
        // grants, a little later): the lag measured is an upper bound, alike for both.
        let asked = epoch.elapsed().as_micros() as u64;
        let granted = lease
            .lease_grant(etcd::LeaseGrantRequest { ttl: a.ttl, id: 0 })
            .await?
            .into_inner();
        let at = asked + granted.ttl as u64 * 1_000_000;
        let key = [prefix.as_slice(), i.to_string().as_bytes()].concat();
        kv.put(etcd::PutRequest {
            key: key.clone(),
            value: b"x".to_vec(),
            lease: granted.id,
            ..Default::default()
        })
        .await?;
        due.push((key, at));
        tokio::time::sleep(gap).await;
    }
    // Wait for every expiry (the TTL, then at most 20 s).
    let deadline = Instant::now() + Duration::from_secs(a.ttl as u64 + 20);
    loop {
        let seen = crate::sync::lock_anyway(&arrivals).len();
        if seen >= a.timers || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    reader.abort();
    let arrived = crate::sync::lock_anyway(&arrivals).clone();
    let mut lag = histogram();
    let mut expired = 0;
    for (key, at) in &due {
        if let Some(when) = arrived.get(key) {
            expired += 1;
            let _ = lag.record(when.saturating_sub(*at).max(1));
        }
    }
    Ok(Lag {
        target,
        timers: a.timers,
        expired,
        lag,
        load_puts: puts.load(Ordering::Relaxed),
    })
}

/// `waft bench-timers`.
pub async fn bench_timers(output: Output, a: &TimerBenchArgs) -> anyhow::Result<ExitCode> {
    let ours = timer_lag("waft", &a.etcd, a).await?;
    let theirs = match a.compare_etcd.is_empty() {
        true => None,
        false => Some(timer_lag("etcd", &a.compare_etcd, a).await?),
    };
    let ratio = theirs.as_ref().map_or(serde_json::Value::Null, |t| {
        serde_json::json!({
            "p50_lag": ms(&ours.lag, 0.5) / ms(&t.lag, 0.5).max(1e-9),
            "p99_lag": ms(&ours.lag, 0.99) / ms(&t.lag, 0.99).max(1e-9),
        })
    });
    let complete = ours.expired == ours.timers;
    let mut results = vec![ours.json()];
    results.extend(theirs.iter().map(Lag::json));
    report(output, "timer-lag", results, ratio);
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
