//! Storage and lifecycle figures: log append per batch size, snapshot build / restore / transfer
//! throughput by state size, restart time with a long log, and module compile vs precompiled
//! load vs instantiate. Real redb files in a temp dir, real nodes on 127.0.0.1, the example kv
//! guest.
//!
//! Run with `cargo bench -p waft --bench storage`. Every figure comes with the baseline it is
//! compared to, measured in the same run (this machine is shared and noisy). Set
//! `WAFT_BENCH_LOG_ENTRIES` to change the long log's length (default 1,000,000).

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, LogId};
use std::time::{Duration, Instant};
use waft::node::{Node, NodeConfig, RaftSettings};
use waft::runtime::{Runtime, RuntimeConfig};
use waft::storage::RedbLog;
use waft::types::{Entry, Request, TypeConfig};

fn entry(index: u64, payload_len: usize) -> Entry {
    Entry {
        log_id: LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 0,
            },
            index,
        ),
        payload: EntryPayload::Normal(Request::Command {
            service: "kv".to_owned(),
            payload: vec![b'x'; payload_len],
            client: None,
            timestamp_ms: index,
        }),
    }
}

/// Appends `total` entries in batches of `batch`, one batch in flight at a time (each waits
/// for its flush), as a follower does; returns the time taken.
async fn append_serial(log: &mut RedbLog, first: u64, total: u64, batch: u64) -> Duration {
    let started = Instant::now();
    let mut next = first;
    while next < first + total {
        let entries: Vec<Entry> = (next..next + batch).map(|i| entry(i, 128)).collect();
        next += batch;
        let (tx, rx) = TypeConfig::oneshot();
        log.append(entries, IOFlushed::signal(tx))
            .await
            .expect("append");
        let flushed: Result<(), std::io::Error> = rx.await.expect("callback");
        flushed.expect("flush");
    }
    started.elapsed()
}

async fn log_append() {
    println!("## log append (redb, immediate durability), 128-byte commands, one batch in flight");
    println!(
        "{:>8} {:>12} {:>14} {:>14} {:>10}",
        "batch", "entries", "µs / batch", "entries / s", "vs 1"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = RedbLog::open(&dir.path().join("log.redb")).expect("open");
    let mut next = 1;
    let mut base = 0.0;
    for batch in [1u64, 16, 64, 256] {
        let total = (batch * 200).clamp(2_000, 40_000);
        let took = append_serial(&mut log, next, total, batch).await;
        next += total;
        let per_s = total as f64 / took.as_secs_f64();
        if batch == 1 {
            base = per_s;
        }
        println!(
            "{batch:>8} {total:>12} {:>14.0} {per_s:>14.0} {:>9.1}x",
            took.as_secs_f64() * 1e6 / (total / batch) as f64,
            per_s / base
        );
    }
}

fn settings() -> RaftSettings {
    RaftSettings {
        heartbeat: Duration::from_millis(100),
        election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
        snapshot_every: u64::MAX / 2,
        keep_after_snapshot: 1_000,
        keep_for_lagging: 200_000,
        audit_interval: None,
        remove_unreachable: None,
    }
}

async fn start(id: u64, dir: &std::path::Path, addr: Option<&str>) -> Node {
    let listener = tokio::net::TcpListener::bind(addr.unwrap_or("127.0.0.1:0"))
        .await
        .expect("bind");
    let mut config = NodeConfig::new(id, dir);
    config.raft = settings();
    Node::start(config, listener).await.expect("node starts")
}

/// A one-node cluster with the kv guest deployed.
async fn single(dir: &std::path::Path) -> Node {
    let node = start(0, dir, None).await;
    node.initialize(
        [(
            0,
            openraft::BasicNode {
                addr: node.addr().to_owned(),
            },
        )]
        .into_iter()
        .collect(),
    )
    .await
    .expect("init");
    wait_leader(&node).await;
    let kv = std::fs::read(waft_testkit::guests::EXAMPLE_KV).expect("kv built");
    let deployed = node
        .raft()
        .client_write(Request::Deploy {
            service: "kv".into(),
            module: kv,
            engine: node.state().engine(),
            limits: Default::default(),
            timestamp_ms: 0,
        })
        .await
        .expect("deploy");
    assert!(
        matches!(deployed.data, waft::types::Response::Deployed { .. }),
        "{:?}",
        deployed.data
    );
    node
}

async fn wait_leader(node: &Node) {
    node.raft()
        .wait(Some(Duration::from_secs(30)))
        .state(openraft::ServerState::Leader, "leads")
        .await
        .expect("leads");
}

async fn wait_applied(node: &Node, index: u64, timeout: Duration) {
    node.raft()
        .wait(Some(timeout))
        .applied_index_at_least(Some(index), "applied")
        .await
        .expect("applied");
}

/// Writes `count` kv puts (`put k{i % keys} VALUE`) with `in_flight` concurrent proposals;
/// returns the last index.
async fn fill(node: &Node, count: u64, keys: u64, value_len: usize, in_flight: u64) -> u64 {
    let value = "v".repeat(value_len);
    let mut tasks = Vec::new();
    for w in 0..in_flight {
        let raft = node.raft().clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            let mut i = w;
            while i < count {
                let r = raft
                    .client_write(Request::Command {
                        service: "kv".into(),
                        payload: format!("put k{:08} {value}", i % keys).into_bytes(),
                        client: None,
                        timestamp_ms: 0,
                    })
                    .await
                    .expect("write");
                last = last.max(r.log_id.index);
                i += in_flight;
            }
            last
        }));
    }
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.expect("writer"));
    }
    last
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

async fn snapshots() {
    println!();
    println!("## snapshots: build (guest snapshot + file), restore on restart, send to a new node");
    println!(
        "{:>10} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "keys", "state MiB", "build MiB/s", "restart s", "restore MiB/s", "send MiB/s"
    );
    for keys in [8_192u64, 65_536] {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = single(&dir.path().join("0")).await;
        let last = fill(&node, keys, keys, 1000, 64).await;
        wait_applied(&node, last, Duration::from_secs(60)).await;
        let state: u64 = node
            .state()
            .service_states()
            .await
            .expect("states")
            .values()
            .map(|s| s.len() as u64)
            .sum();
        let started = Instant::now();
        node.raft().trigger().snapshot().await.expect("trigger");
        node.raft()
            .wait(Some(Duration::from_secs(300)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= last),
                "snapshot built",
            )
            .await
            .expect("snapshot");
        let build = started.elapsed();
        let addr = node.addr().to_owned();
        node.shutdown().await.expect("stop");
        let started = Instant::now();
        let node = start(0, &dir.path().join("0"), Some(&addr)).await;
        wait_applied(&node, last, Duration::from_secs(300)).await;
        let restart = started.elapsed();
        wait_leader(&node).await;
        let learner = start(1, &dir.path().join("1"), None).await;
        let started = Instant::now();
        node.raft()
            .add_learner(
                1,
                openraft::BasicNode {
                    addr: learner.addr().to_owned(),
                },
                true,
            )
            .await
            .expect("add learner");
        wait_applied(&learner, last, Duration::from_secs(300)).await;
        let send = started.elapsed();
        println!(
            "{keys:>10} {:>10.1} {:>12.1} {:>12.2} {:>12.1} {:>12.1}",
            mib(state),
            mib(state) / build.as_secs_f64(),
            restart.as_secs_f64(),
            mib(state) / restart.as_secs_f64(),
            mib(state) / send.as_secs_f64()
        );
        learner.shutdown().await.expect("stop");
        node.shutdown().await.expect("stop");
    }
}

async fn long_log() {
    let entries: u64 = std::env::var("WAFT_BENCH_LOG_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!();
    println!("## restart with {entries} entries in the log (kv puts on 10,000 keys)");
    let dir = tempfile::tempdir().expect("tempdir");
    let node = single(dir.path()).await;
    let started = Instant::now();
    let last = fill(&node, entries, 10_000, 16, 256).await;
    let filled = started.elapsed();
    println!(
        "filled through Raft in one process: {:.1} s ({:.0} writes/s, 256 in flight)",
        filled.as_secs_f64(),
        entries as f64 / filled.as_secs_f64()
    );
    let log_bytes = std::fs::metadata(dir.path().join("log.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let addr = node.addr().to_owned();
    node.shutdown().await.expect("stop");
    let started = Instant::now();
    let node = start(0, dir.path(), Some(&addr)).await;
    let opened = started.elapsed();
    wait_applied(&node, last, Duration::from_secs(1800)).await;
    let replayed = started.elapsed();
    println!(
        "restart, no snapshot (every entry replayed into the guest): open {:.2} s, applied all \
         {:.1} s ({:.0} entries/s); log file {:.0} MiB",
        opened.as_secs_f64(),
        replayed.as_secs_f64(),
        entries as f64 / replayed.as_secs_f64(),
        mib(log_bytes)
    );
    wait_leader(&node).await;
    node.raft().trigger().snapshot().await.expect("trigger");
    node.raft()
        .wait(Some(Duration::from_secs(300)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot built",
        )
        .await
        .expect("snapshot");
    node.shutdown().await.expect("stop");
    let started = Instant::now();
    let node = start(0, dir.path(), Some(&addr)).await;
    wait_applied(&node, last, Duration::from_secs(300)).await;
    let from_snapshot = started.elapsed();
    println!(
        "restart after a snapshot at the last entry (the default policy snapshots every 10,000): \
         {:.2} s ({:.0}x faster)",
        from_snapshot.as_secs_f64(),
        replayed.as_secs_f64() / from_snapshot.as_secs_f64()
    );
    node.shutdown().await.expect("stop");
}

fn modules() {
    println!();
    println!("## the kv module: compile, load precompiled from disk, load cached, instantiate");
    let kv = std::fs::read(waft_testkit::guests::EXAMPLE_KV).expect("kv built");
    let cache = tempfile::tempdir().expect("tempdir");
    let config = || RuntimeConfig {
        cache_dir: Some(cache.path().to_owned()),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::new(config()).expect("runtime");
    let t = Instant::now();
    let module = runtime.load(&kv).expect("compile");
    let compile = t.elapsed();
    let t = Instant::now();
    let _ = runtime.load(&kv).expect("cached");
    let cached = t.elapsed();
    let fresh = Runtime::new(config()).expect("runtime");
    let t = Instant::now();
    let _ = fresh.load(&kv).expect("from disk");
    let from_disk = t.elapsed();
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(runtime.instantiate(&module, "bench").expect("instantiate"));
    }
    let instantiate = t.elapsed() / n;
    println!(
        "compile {:.1} ms; precompiled from disk {:.2} ms ({:.0}x faster); in memory {:.3} ms; \
         instantiate {:.3} ms",
        compile.as_secs_f64() * 1e3,
        from_disk.as_secs_f64() * 1e3,
        compile.as_secs_f64() / from_disk.as_secs_f64(),
        cached.as_secs_f64() * 1e3,
        instantiate.as_secs_f64() * 1e3
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    modules();
    log_append().await;
    snapshots().await;
    long_log().await;
}
