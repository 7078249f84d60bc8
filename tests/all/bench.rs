//! `waft bench` against a live in-process cluster, and against a real etcd when one is
//! installed (the same workload through etcd's v3 KV API).

use crate::support::cluster::{TestCluster, test_settings};
use crate::support::waft_cli as waft;
use std::process::Output;
use std::time::Duration;
use waft_testkit::guests::EXAMPLE_KV;

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "waft bench failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_measures_writes_and_reads_on_a_cluster() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let endpoints = cluster.addrs.join(",");
    let base = |extra: &[&'static str]| -> Vec<&str> {
        let mut v = vec!["--output", "json", "bench", "--endpoints", &endpoints];
        v.extend_from_slice(extra);
        v
    };
    for api in ["session", "unary"] {
        let d = json(
            &waft(&base(&[
                "--clients",
                "4",
                "--count",
                "300",
                "--warmup",
                "0.2",
                "--keys",
                "50",
                "--api",
                api,
            ]))
            .await,
        );
        let r = &d["results"][0];
        assert_eq!(r["target"], "waft");
        assert_eq!(d["workload"]["api"], api);
        assert!(r["ops"].as_u64().expect("ops") >= 300, "{d}");
        assert_eq!(r["errors"], 0, "{d}");
        let p50 = r["latency_ms"]["p50"].as_f64().expect("p50");
        let p99 = r["latency_ms"]["p99"].as_f64().expect("p99");
        assert!(p50 > 0.0 && p99 >= p50, "{d}");
    }
    let keys = cluster
        .node(0)
        .state()
        .query("kv", b"scan key".to_vec())
        .await
        .expect("scan");
    let written = String::from_utf8_lossy(&keys).lines().count();
    assert!(
        written > 0 && written <= 50,
        "puts landed on at most 50 keys: {written}"
    );

    tracing::info!("batched writes: a SubmitBatch of 8 per request, every write counted");
    let d = json(
        &waft(&base(&[
            "--clients",
            "2",
            "--count",
            "400",
            "--warmup",
            "0",
            "--keys",
            "1000",
            "--batch",
            "8",
        ]))
        .await,
    );
    let r = &d["results"][0];
    assert_eq!(r["errors"], 0, "{d}");
    assert_eq!(r["batch"], 8, "{d}");
    let ops = r["ops"].as_u64().expect("ops");
    assert!(ops >= 400 && ops.is_multiple_of(8), "{d}");

    tracing::info!("reads, at every consistency level");
    for consistency in ["linearizable", "lease", "stale"] {
        let d = json(
            &waft(&base(&[
                "--clients",
                "2",
                "--count",
                "100",
                "--warmup",
                "0",
                "--read-ratio",
                "1.0",
                "--consistency",
                consistency,
            ]))
            .await,
        );
        assert_eq!(d["results"][0]["errors"], 0, "{consistency}: {d}");
    }

    tracing::info!(
        "a service that is not there is an error, not a fast benchmark; a count that can never \
         be reached ends after 5 s of nothing but errors"
    );
    let o = waft(&base(&[
        "--clients",
        "1",
        "--count",
        "100",
        "--warmup",
        "0",
        "--service",
        "nope",
    ]))
    .await;
    assert!(!o.status.success());
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(d["results"][0]["ops"], 0);
    assert!(
        d["results"][0]["first_error"]
            .as_str()
            .is_some_and(|e| e.contains("NotFound")),
        "{d}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_speaks_etcds_kv_api_and_compares() {
    let etcd = crate::support::Etcd::start();
    let etcd_addr = etcd.addr.clone();
    let cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    // etcd takes a moment to elect itself.
    let mut last = None;
    for _ in 0..100 {
        let o = waft(&[
            "--output",
            "json",
            "bench",
            "--endpoints",
            &cluster.addrs[0],
            "--compare-etcd",
            &etcd_addr,
            "--clients",
            "2",
            "--count",
            "100",
            "--warmup",
            "0",
        ])
        .await;
        if o.status.success() {
            last = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let d = json(&last.expect("etcd answered within 20 s"));
    assert_eq!(d["results"][1]["target"], "etcd");
    assert!(d["results"][1]["ops"].as_u64().expect("ops") >= 100, "{d}");
    assert_eq!(d["results"][1]["errors"], 0, "{d}");
    assert!(
        d["ratio"]["throughput"].as_f64().expect("ratio") > 0.0,
        "{d}"
    );
    // Batched: waft's SubmitBatch against etcd's Txn of as many puts (distinct keys).
    let d = json(
        &waft(&[
            "--output",
            "json",
            "bench",
            "--endpoints",
            &cluster.addrs[0],
            "--compare-etcd",
            &etcd_addr,
            "--clients",
            "2",
            "--count",
            "160",
            "--warmup",
            "0",
            "--batch",
            "16",
        ])
        .await,
    );
    for r in d["results"].as_array().expect("results") {
        assert_eq!(r["errors"], 0, "{d}");
        assert!(r["ops"].as_u64().expect("ops") >= 160, "{d}");
    }
    cluster.shutdown().await;
}

/// `waft bench-watch` and `waft bench-timers` load waft's etcd endpoint and a real etcd alike
/// and report every event delivered, every lease expired, and the ratios.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_watch_and_bench_timers_measure_waft_and_etcd_alike() {
    crate::support::require_tool("etcdctl", &["version"], "apt-get install etcd-client");
    let etcd = crate::support::Etcd::start();
    crate::etcd::wait_healthy(&etcd.addr).await;
    let (cluster, endpoint) = crate::etcd::etcd_cluster().await;
    let d = json(
        &waft(&[
            "--output",
            "json",
            "bench-watch",
            "--etcd",
            &endpoint,
            "--compare-etcd",
            &etcd.addr,
            "--watchers",
            "20",
            "--streams",
            "4",
            "--writers",
            "2",
            "--duration",
            "1",
        ])
        .await,
    );
    for r in d["results"].as_array().expect("results") {
        assert!(r["puts"].as_u64().expect("puts") > 0, "{d}");
        assert_eq!(
            r["delivered"], r["expected"],
            "every put reached every watcher: {d}"
        );
    }
    assert!(
        d["ratio"]["events_per_sec"].as_f64().expect("ratio") > 0.0,
        "{d}"
    );
    let d = json(
        &waft(&[
            "--output",
            "json",
            "bench-timers",
            "--etcd",
            &endpoint,
            "--compare-etcd",
            &etcd.addr,
            "--timers",
            "5",
            "--spread",
            "0.5",
            "--load",
            "2",
        ])
        .await,
    );
    for r in d["results"].as_array().expect("results") {
        assert_eq!(r["expired"], 5, "every lease ran out and was seen: {d}");
    }
    assert!(d["ratio"]["p99_lag"].as_f64().expect("ratio") > 0.0, "{d}");
    cluster.shutdown().await;
}
