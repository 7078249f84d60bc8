//! The Prometheus endpoint: Raft progress, replication lag, per-service counters and apply
//! latency, audit results.

use crate::support::cluster::{TestCluster, kv, test_settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waft::types::Request;
use waft_testkit::guests::{EXAMPLE_KV, TEST_HOSTILE};

pub(crate) async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    c.read_to_string(&mut out).await.expect("read");
    out
}

pub(crate) fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_show_raft_progress_services_and_audits() {
    let cluster = TestCluster::start_with(3, test_settings(), |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    cluster
        .deploy("evil", waft_testkit::wasm(TEST_HOSTILE))
        .await;
    for i in 0..20 {
        cluster.write(kv(format!("put k{i} v"))).await;
    }
    cluster.write(kv("get missing")).await;
    let evil = |cmd: &str| Request::Command {
        service: "evil".into(),
        payload: cmd.as_bytes().to_vec(),
        client: None,
        timestamp_ms: 1,
    };
    cluster.write(evil("panic-after-set a 1")).await;
    let leader = cluster.wait_leader().await;
    let audit = cluster.node(leader).audit().await.expect("audit");
    cluster.wait_applied(audit.report_index).await;
    // Client calls through a follower: a forwarded submit (counted there and on the leader)
    // and a query for a service that does not exist (NOT_FOUND, answered there).
    let follower = (leader + 1) % 3;
    let mut c = waft::pb::api::waft_client::WaftClient::connect(format!(
        "http://{}",
        cluster.addrs[follower]
    ))
    .await
    .expect("connect");
    c.submit(waft::pb::api::SubmitRequest {
        service: "kv".into(),
        payload: b"put via grpc".to_vec(),
        client_id: 0,
        sequence: 0,
    })
    .await
    .expect("submit");
    let missing = c
        .query(waft::pb::api::QueryRequest {
            service: "nope".into(),
            payload: b"get a".to_vec(),
            consistency: waft::pb::api::Consistency::Stale as i32,
        })
        .await
        .expect_err("no such service");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let raft = cluster.node(leader).raft();
    raft.trigger().snapshot().await.expect("snapshot");
    let applied = cluster
        .node(leader)
        .metrics()
        .last_applied
        .map_or(0, |l| l.index);
    raft.wait(Some(std::time::Duration::from_secs(30)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied),
            "snapshot built",
        )
        .await
        .expect("snapshot built");
    cluster.wait_applied(applied).await;

    let mut served = Vec::new();
    for node in cluster.nodes.iter().flatten() {
        let addr = node.metrics_addr().expect("metrics served");
        let response = get(addr, "/metrics").await;
        served.push(response.split("\r\n\r\n").nth(1).expect("body").to_owned());
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("text/plain; version=0.0.4"));
        let text = response.split("\r\n\r\n").nth(1).expect("body");
        let is_leader = node.id() as usize == leader;
        assert_eq!(
            value(text, "waft_raft_role{role=\"leader\"}"),
            if is_leader { 1.0 } else { 0.0 }
        );
        assert!(value(text, "waft_raft_term") >= 1.0);
        assert_eq!(value(text, "waft_raft_leader_id"), leader as f64);
        assert!(value(text, "waft_raft_applied_index") >= audit.report_index as f64);
        assert_eq!(
            value(text, "waft_service_applied_total{service=\"kv\"}"),
            21.0
        );
        let submits = "waft_grpc_requests_total{method=\"waft.v1.Waft/Submit\",code=\"OK\"}";
        let not_found =
            "waft_grpc_requests_total{method=\"waft.v1.Waft/Query\",code=\"NOT_FOUND\"}";
        let submit_count = "waft_grpc_request_seconds_count{method=\"waft.v1.Waft/Submit\"}";
        // The follower forwarded the submit to the leader in a batch (of one).
        let batches = "waft_grpc_requests_total{method=\"waft.v1.Waft/SubmitBatch\",code=\"OK\"}";
        if node.id() as usize == follower {
            assert_eq!(value(text, submits), 1.0, "node {}", node.id());
            assert_eq!(value(text, submit_count), 1.0);
            assert_eq!(value(text, "waft_forwarded_batches_total"), 1.0);
            assert_eq!(value(text, "waft_forwarded_commands_total"), 1.0);
        } else {
            assert!(!text.contains(submits), "node {}", node.id());
            assert_eq!(value(text, "waft_forwarded_commands_total"), 0.0);
        }
        if is_leader {
            assert_eq!(value(text, batches), 1.0);
        } else {
            assert!(!text.contains(batches), "node {}", node.id());
        }
        if node.id() as usize == follower {
            assert_eq!(value(text, not_found), 1.0);
        }
        assert!(value(text, "waft_service_memory_bytes{service=\"kv\"}") > 0.0);
        assert!(value(text, "waft_service_code_bytes{service=\"kv\"}") > 0.0);
        assert!(value(text, "waft_service_history_bytes{service=\"kv\"}") > 0.0);
        // Every node compiled kv (or loaded compiled code it had); none fetched any.
        assert!(
            value(text, "waft_modules_compiled_total")
                + value(text, "waft_modules_loaded_compiled_total")
                >= 1.0
        );
        assert_eq!(value(text, "waft_modules_compiled_fetched_total"), 0.0);
        // The WAL's entries in memory: those after the last purge (the snapshot above may have
        // purged them all), never more than the log has.
        let held = value(text, "waft_log_memory_entries");
        assert!(
            held <= value(text, "waft_raft_last_log_index") + 1.0,
            "{held}"
        ); // from index 0
        let bytes = value(text, "waft_log_memory_bytes");
        assert!(
            (held == 0.0 && bytes == 0.0) || bytes > held * 8.0,
            "{held} {bytes}"
        );
        assert!(value(text, "process_resident_memory_bytes") > 0.0);
        // No --max-guest-memory: no budget; kv and evil reserve their limits and code.
        assert_eq!(value(text, "waft_guest_memory_budget_bytes"), 0.0);
        assert!(
            value(text, "waft_guest_memory_reserved_bytes")
                > value(text, "waft_service_code_bytes{service=\"kv\"}")
        );
        if is_leader {
            // The leader timed its heartbeats and appends to the followers.
            for kind in ["heartbeat", "append"] {
                let count = format!("waft_peer_round_trip_seconds_count{{kind=\"{kind}\"}}");
                let inf =
                    format!("waft_peer_round_trip_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}}");
                assert!(value(text, &count) >= 1.0, "{kind}");
                assert_eq!(value(text, &count), value(text, &inf));
            }
            assert!(value(text, "waft_snapshot_built_total") >= 1.0);
            assert!(value(text, "waft_snapshot_last_built_bytes") > 0.0);
            assert!(value(text, "waft_snapshot_last_build_seconds") > 0.0);
        }
        assert_eq!(
            value(text, "waft_service_rejected_total{service=\"kv\"}"),
            1.0
        );
        assert_eq!(
            value(text, "waft_service_trapped_total{service=\"evil\"}"),
            1.0
        );
        assert!(value(text, "waft_service_recoveries_total{service=\"evil\"}") >= 1.0);
        assert!(value(text, "waft_service_fuel_total{service=\"kv\"}") > 0.0);
        assert_eq!(
            value(text, "waft_service_apply_seconds_count{service=\"kv\"}"),
            22.0
        );
        assert_eq!(
            value(
                text,
                "waft_service_apply_seconds_bucket{service=\"kv\",le=\"+Inf\"}"
            ),
            22.0
        );
        assert_eq!(value(text, "waft_audit_checks_total"), 1.0);
        assert_eq!(value(text, "waft_audit_divergences"), 0.0);
        for healthy in [
            "waft_audit_divergences_total",
            "waft_heals_total",
            "waft_heal_failures_total",
            "waft_services_unavailable",
        ] {
            assert_eq!(value(text, healthy), 0.0, "{healthy}");
        }
        if is_leader {
            // Every follower has applied the audit report: none lags by more than what came
            // after it (nothing did).
            let last = value(text, "waft_raft_last_log_index");
            for peer in (0..3).filter(|p| *p != leader) {
                let lag = value(
                    text,
                    &format!("waft_raft_replication_lag_entries{{peer=\"{peer}\"}}"),
                );
                assert!(lag < last, "peer {peer} lags by {lag} of {last}");
            }
        }
    }
    // What deploy/ ships for Prometheus and Grafana names only what the nodes served.
    crate::dashboards::check(&served.iter().map(String::as_str).collect::<Vec<_>>());
    let other = get(cluster.node(0).metrics_addr().expect("addr"), "/").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    cluster.shutdown().await;
}

/// The `waft` binary allocates with jemalloc and shows its heap next to the process's RSS,
/// and a node that logs to the WAL shows the entries it holds in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_shows_its_heap_and_log_in_memory() {
    let metrics = crate::support::free_addr();
    let c = crate::support::procs::ProcCluster::start(1, &["--metrics-listen", &metrics]).await;
    let response = get(metrics.parse().expect("addr"), "/metrics").await;
    let text = response.split("\r\n\r\n").nth(1).expect("body");
    let allocated = value(text, "waft_allocator_allocated_bytes");
    let heap = value(text, "waft_allocator_resident_bytes");
    let rss = value(text, "process_resident_memory_bytes");
    // jemalloc's resident count may include untouched pages, so it is not compared with RSS.
    assert!(allocated > 0.0 && allocated <= heap && rss > 0.0, "{text}");
    // Forming the cluster wrote a few entries (membership, blank leader entries).
    assert!(value(text, "waft_log_memory_entries") >= 1.0, "{text}");
    drop(c);
}
