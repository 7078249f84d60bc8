//! Hot-swap timing: from the deploy call to "serving on all three nodes", for the kv guest and
//! for a large module, with client load running, and how many client requests failed during
//! the swap. An in-process 3-node cluster on 127.0.0.1 with real redb files.
//!
//! Run with `cargo bench -p waft --bench hotswap`. Figures vary with the machine; the report
//! also gives the median write latency without a swap, measured in the same run, as a baseline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use waft::node::{Node, NodeConfig};
use waft::pb::api::{self, waft_client::WaftClient};

/// A valid component made large: kv plus a custom section of `extra` bytes.
fn padded(module: &[u8], extra: usize) -> Vec<u8> {
    let name = b"waft-bench-padding";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.resize(payload.len() + extra, 0xAB);
    let mut out = module.to_vec();
    out.push(0); // custom section id
    let mut len = payload.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&payload);
    out
}

async fn deploy(addr: &str, module: Vec<u8>) -> api::DeployReply {
    let mut c = WaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX);
    let chunks = waft::pb::deploy_chunks("kv", &module, false);
    c.deploy(futures::stream::iter(chunks))
        .await
        .expect("deploy")
        .into_inner()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    let mut members = std::collections::BTreeMap::new();
    for i in 0..3u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let node = Node::start(NodeConfig::new(i, dir.path().join(i.to_string())), listener)
            .await
            .expect("node");
        members.insert(
            i,
            openraft::BasicNode {
                addr: node.addr().to_owned(),
            },
        );
        nodes.push(node);
    }
    nodes[0].raft().initialize(members).await.expect("init");
    let addr = nodes[0].addr().to_owned();
    let kv = std::fs::read(waft_testkit::guests::EXAMPLE_KV).expect("kv built");
    let kv2 = std::fs::read(waft_testkit::guests::TEST_KV2).expect("kv2 built");
    tokio::time::sleep(Duration::from_secs(2)).await;
    deploy(&addr, kv.clone()).await;

    // Client load: 4 tasks submitting puts, counting successes and failures.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Duration)>::new()));
    let mut load = Vec::new();
    for t in 0..4 {
        let (stop, ok, failed, lat) = (stop.clone(), ok.clone(), failed.clone(), latencies.clone());
        let addr = nodes[t % 3].addr().to_owned();
        load.push(tokio::spawn(async move {
            let mut c = WaftClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let started = Instant::now();
                let req = api::SubmitRequest {
                    service: "kv".into(),
                    payload: format!("put t{t}-{} {i}", i % 100).into_bytes(),
                    client_id: 0,
                    sequence: 0,
                };
                match c.submit(req).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        lat.lock().expect("lock").push((started, started.elapsed()));
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("hot-swap under load (4 clients, 3 nodes, in one process)");
    println!(
        "{:<34} {:>12} {:>14} {:>10}",
        "module", "size", "to serving", "failed"
    );
    let large = padded(&kv2, 8 << 20);
    for (name, module) in [
        ("kv v2", kv2.clone()),
        ("kv v1 (back)", kv.clone()),
        ("kv v2 + 8 MiB custom section", large),
    ] {
        let size = module.len();
        let hash = waft::runtime::ModuleHash::of(&module);
        let failed_before = failed.load(Ordering::Relaxed);
        let started = Instant::now();
        deploy(&addr, module).await;
        // Serving everywhere: every node's state machine runs the new module.
        while !nodes.iter().all(|n| {
            n.state()
                .services()
                .first()
                .is_some_and(|s| s.module.hash == hash)
        }) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let took = started.elapsed();
        let failed_during = failed.load(Ordering::Relaxed) - failed_before;
        println!(
            "{name:<34} {size:>12} {:>11.1} ms {failed_during:>10}",
            took.as_secs_f64() * 1e3
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    let mut lat: Vec<Duration> = latencies
        .lock()
        .expect("lock")
        .iter()
        .map(|(_, d)| *d)
        .collect();
    lat.sort();
    println!(
        "client writes: {} ok, {} failed; median write latency {:.2} ms, p99 {:.2} ms (baseline for the figures above)",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        lat[lat.len() / 2].as_secs_f64() * 1e3,
        lat[lat.len() * 99 / 100].as_secs_f64() * 1e3
    );
    for n in nodes {
        let _ = n.shutdown().await;
    }
}
