//! Memory per service (issue 23): shown in `ListServices`, `Status` and `/metrics`, bounded by
//! the node's budget (`--max-guest-memory`) before anything is proposed, and never a reason
//! to stop serving what the log committed.

use crate::hotswap::client;
use crate::support::cluster::{TestCluster, kv, test_settings};
use tonic::transport::Channel;
use waft::pb::api::{self, cluster_client::ClusterClient};
use waft_testkit::guests::{EXAMPLE_COUNTER, EXAMPLE_KV, TEST_KV2};

const MIB: u64 = 1 << 20;

/// Deploys `path` as `service` with a memory limit of `memory` bytes (0: the node's).
async fn deploy(
    addr: &str,
    service: &str,
    path: &str,
    memory: u64,
) -> Result<api::DeployReply, tonic::Status> {
    crate::hotswap::deploy_with_limits(addr, service, path, false, 0, memory).await
}

async fn rollback(addr: &str, service: &str) -> Result<api::DeployReply, tonic::Status> {
    client(addr)
        .await
        .rollback(api::RollbackRequest {
            service: service.into(),
            to_version: 0,
        })
        .await
        .map(|r| r.into_inner())
}

async fn status(addr: &str) -> api::StatusReply {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    ClusterClient::new(ch)
        .status(api::StatusRequest::default())
        .await
        .expect("status")
        .into_inner()
}

async fn services(addr: &str) -> Vec<api::ServiceInfo> {
    client(addr)
        .await
        .list_services(api::ListServicesRequest {})
        .await
        .expect("services")
        .into_inner()
        .services
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guest_memory_is_shown_and_bounded_by_the_budget_before_anything_is_proposed() {
    let mut cluster = TestCluster::start_with(1, test_settings(), |c| {
        c.api.max_guest_memory = Some(300 * MIB);
        c.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    cluster.form().await;
    let addr = cluster.addrs[0].clone();
    // kv with the node's default limit (256 MiB) and its code: within 300 MiB.
    deploy(&addr, "kv", EXAMPLE_KV, 0)
        .await
        .expect("within the budget");
    let (index, _) = cluster.write(kv("put a 1")).await;
    cluster.wait_applied(index).await;

    // Shown: per service, and for the node.
    let list = services(&addr).await;
    let kv_info = &list[0];
    assert!(kv_info.memory_bytes > 0, "{kv_info:?}");
    assert!(kv_info.code_bytes > 0, "{kv_info:?}");
    let memory = status(&addr).await.guest_memory.expect("guest memory");
    assert_eq!(memory.memory_bytes, kv_info.memory_bytes);
    assert_eq!(memory.code_bytes, kv_info.code_bytes);
    assert_eq!(memory.reserved_bytes, 256 * MIB + kv_info.code_bytes);
    assert_eq!(memory.budget_bytes, 300 * MIB);
    // The same on /metrics, for the alert on a budget nearly used up.
    let scraped =
        crate::metrics::get(cluster.node(0).metrics_addr().expect("metrics"), "/metrics").await;
    for (series, want) in [
        ("waft_guest_memory_reserved_bytes", memory.reserved_bytes),
        ("waft_guest_memory_budget_bytes", memory.budget_bytes),
    ] {
        assert_eq!(
            crate::metrics::value(&scraped, series),
            want as f64,
            "{series}"
        );
    }

    // A second service with the default limit would reserve over 512 MiB: refused in words,
    // and nothing reaches the log.
    let last = cluster.node(0).metrics().last_log_index;
    let over = deploy(&addr, "counter", EXAMPLE_COUNTER, 0)
        .await
        .expect_err("over the budget");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over}");
    for words in ["--max-guest-memory", "300 MiB", "\"counter\"", "kv 256 MiB"] {
        assert!(over.message().contains(words), "{words}: {over}");
    }
    assert_eq!(cluster.node(0).metrics().last_log_index, last);
    assert_eq!(services(&addr).await.len(), 1);
    // With a limit of its own it fits.
    deploy(&addr, "counter", EXAMPLE_COUNTER, 16 * MIB)
        .await
        .expect("a small limit fits");

    // kv's version 2 with a small limit shrinks the reservation, and makes room for a third
    // service (the counter's module again: its code counts once); rolling kv back to version
    // 1 (256 MiB again) would not fit: refused, and version 2 keeps serving.
    deploy(&addr, "kv", TEST_KV2, 16 * MIB)
        .await
        .expect("smaller");
    deploy(&addr, "counter2", EXAMPLE_COUNTER, 200 * MIB)
        .await
        .expect("fits now");
    let refused = rollback(&addr, "kv").await.expect_err("over the budget");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    let kv_now = services(&addr).await.into_iter().find(|s| s.name == "kv");
    assert_eq!(kv_now.map(|s| s.version), Some(2));

    // Restarted with a smaller budget than its services reserve: it says so, and serves.
    cluster.configure = |c| c.api.max_guest_memory = Some(16 * MIB);
    cluster.stop(0).await;
    cluster.restart(0).await;
    cluster.wait_leader().await;
    let got = cluster
        .node(0)
        .state()
        .query("kv", b"get a".to_vec())
        .await
        .expect("kv serves");
    assert_eq!(got, b"1");
    let memory = status(&cluster.addrs[0]).await.guest_memory.expect("gm");
    assert!(memory.reserved_bytes > memory.budget_bytes, "{memory:?}");
    let (index, _) = cluster.write(kv("put b 2")).await;
    cluster.wait_applied(index).await;
    cluster.shutdown().await;
}

/// Each member checks its own budget when the leader asks it to hold the module: a deploy
/// that would take any member over its budget is refused before anything is proposed, naming
/// the member; within every budget it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_with_a_smaller_budget_refuses_a_deploy_before_anything_is_proposed() {
    let mut cluster = TestCluster::start_with(3, test_settings(), |c| {
        if c.id == 2 {
            c.api.max_guest_memory = Some(100 * MIB);
        }
    })
    .await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let addr = cluster.addrs[leader].clone();
    let last = cluster.node(leader).metrics().last_log_index;
    // The node's default limit (256 MiB) is over node 2's 100 MiB.
    let over = deploy(&addr, "kv", EXAMPLE_KV, 0)
        .await
        .expect_err("over node 2's budget");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over}");
    for words in ["--max-guest-memory", "100 MiB", "\"kv\""] {
        assert!(over.message().contains(words), "{words}: {over}");
    }
    if leader != 2 {
        assert!(over.message().contains("node 2 at"), "{over}");
    }
    assert_eq!(cluster.node(leader).metrics().last_log_index, last);
    assert!(services(&addr).await.is_empty());
    // Within every budget: deployed, and a later version over node 2's budget is refused
    // while version 1 keeps serving.
    deploy(&addr, "kv", EXAMPLE_KV, 16 * MIB)
        .await
        .expect("within every budget");
    let refused = deploy(&addr, "kv", TEST_KV2, 200 * MIB)
        .await
        .expect_err("over node 2's budget");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    let kv_now = services(&addr).await.into_iter().find(|s| s.name == "kv");
    assert_eq!(kv_now.map(|s| s.version), Some(1));

    // A rollback is checked the same way: node 2, restarted without a budget, lets version 2
    // (200 MiB) through; version 3 is small again; restarted with its 100 MiB budget, it
    // refuses the rollback to version 2, and version 3 keeps serving.
    if leader != 2 {
        cluster.configure = |_| {};
        cluster.stop(2).await;
        cluster.restart(2).await;
        deploy(&addr, "kv", TEST_KV2, 200 * MIB)
            .await
            .expect("no budget on node 2 now");
        deploy(&addr, "kv", EXAMPLE_KV, 16 * MIB)
            .await
            .expect("version 3");
        cluster.configure = |c| {
            if c.id == 2 {
                c.api.max_guest_memory = Some(100 * MIB);
            }
        };
        cluster.stop(2).await;
        cluster.restart(2).await;
        // Node 2 checks against the services it has applied: let it catch up first.
        let last = cluster
            .node(leader)
            .metrics()
            .last_log_index
            .expect("entries");
        cluster.wait_applied(last).await;
        let refused = rollback(&addr, "kv")
            .await
            .expect_err("over node 2's budget");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        assert!(refused.message().contains("node 2 at"), "{refused}");
        let kv_now = services(&addr).await.into_iter().find(|s| s.name == "kv");
        assert_eq!(kv_now.map(|s| s.version), Some(3));
    }
    let (index, _) = cluster.write(kv("put a 1")).await;
    cluster.wait_applied(index).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

/// A rollback to a version whose compiled code was removed from the disk cache compiles it
/// again; the services keep their state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_after_the_compiled_code_was_removed_compiles_again() {
    let cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    let addr = cluster.addrs[0].clone();
    deploy(&addr, "kv", EXAMPLE_KV, 0).await.expect("v1");
    let (index, _) = cluster.write(kv("put a 1")).await;
    cluster.wait_applied(index).await;
    deploy(&addr, "kv", TEST_KV2, 0).await.expect("v2");
    let cache = cluster.dirs[0].path().join("cache");
    let mut removed = 0;
    for entry in std::fs::read_dir(&cache).expect("cache dir").flatten() {
        if entry.path().extension().is_some_and(|e| e == "cwasm") {
            std::fs::remove_file(entry.path()).expect("remove");
            removed += 1;
        }
    }
    assert!(removed >= 2, "compiled code of both versions was on disk");
    let (compiled_before, _) = cluster.node(0).state().compile_stats();
    let back = rollback(&addr, "kv").await.expect("rollback");
    assert_eq!(back.version, 3);
    let (compiled_after, _) = cluster.node(0).state().compile_stats();
    assert!(compiled_after.compiled > compiled_before.compiled);
    let got = cluster
        .node(0)
        .state()
        .query("kv", b"get a".to_vec())
        .await
        .expect("serves");
    assert_eq!(got, b"1");
    cluster.shutdown().await;
}
