//! A replicated cluster: three in-process nodes over real gRPC, redb and the kv guest.

use crate::cluster_support::{TestCluster, kv, test_settings};
use std::time::Duration;
use waft::node::RaftSettings;
use waft::raft::types::Response;
use waft_testkit::guests::EXAMPLE_KV;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_apply_1000_writes_and_agree_byte_for_byte() {
    let cluster = TestCluster::start(3, test_settings()).await;
    tracing::info!("form the cluster: initialize, add learners, change membership");
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    tracing::info!("1,000 writes through the leader");
    let mut last = 0;
    for i in 0..1000 {
        let (index, resp) = cluster
            .write(kv(format!("put key{:04} value-{i}", i % 300)))
            .await;
        assert_eq!(resp, Response::Reply(b"OK".to_vec()));
        last = index;
    }
    cluster.wait_applied(last).await;
    tracing::info!("every node's guest snapshot is byte-identical");
    let states = cluster.assert_identical().await;
    assert!(states["kv"].len() > 300 * 10);
    let answer = cluster
        .node(2)
        .state()
        .query("kv", b"get key0299".to_vec())
        .await
        .expect("query");
    assert_eq!(answer, b"value-899");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_purged_entries_catches_up_by_snapshot() {
    let settings = RaftSettings {
        snapshot_every: 500,
        keep_after_snapshot: 0,
        ..test_settings()
    };
    let mut cluster = TestCluster::start(3, settings).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let leader = cluster.wait_leader().await;
    let lagger = (leader + 1) % 3;
    tracing::info!(
        lagger,
        "stop a follower, then write 5,000 entries so the log is purged past it"
    );
    cluster.stop(lagger).await;
    let mut last = 0;
    for i in 0..5000 {
        last = cluster.write(kv(format!("put k{} v{i}", i % 1000))).await.0;
    }
    let leader = cluster.wait_leader().await;
    let purged = cluster
        .node(leader)
        .metrics()
        .purged
        .map(|p| p.index)
        .unwrap_or(0);
    assert!(
        purged > 1000,
        "the leader purged its log (purged up to {purged})"
    );
    tracing::info!("restart the follower: it must install a snapshot to catch up");
    cluster.restart(lagger).await;
    cluster.wait_applied(last).await;
    let m = cluster.node(lagger).metrics();
    let snap = m.snapshot.expect("the lagging node holds a snapshot");
    assert!(
        snap.index >= purged,
        "it installed the leader's snapshot ({} >= {purged})",
        snap.index
    );
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_replays_from_its_snapshot_and_reuses_compiled_guests() {
    let settings = RaftSettings {
        snapshot_every: 200,
        ..test_settings()
    };
    let mut cluster = TestCluster::start(3, settings).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let mut last = 0;
    for i in 0..700 {
        last = cluster.write(kv(format!("put k{} v{i}", i % 50))).await.0;
    }
    cluster.wait_applied(last).await;
    let restarted = (cluster.wait_leader().await + 2) % 3;
    let before = cluster.node(restarted).metrics().snapshot;
    assert!(before.is_some(), "a snapshot was taken");
    cluster.stop(restarted).await;
    cluster.restart(restarted).await;
    cluster.wait_applied(last).await;
    let services = cluster.node(restarted).state().services();
    assert_eq!(services.len(), 1);
    assert!(
        services[0].module.from_disk_cache,
        "the restarted node loaded the compiled kv module from its cache instead of recompiling"
    );
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_write_is_lost_when_the_leader_stops_under_load() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let cluster = std::sync::Arc::new(tokio::sync::RwLock::new(cluster));
    tracing::info!("four writers; the leader is stopped while they write");
    let mut writers = Vec::new();
    for w in 0..4 {
        let cluster = cluster.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
            let mut i = 0;
            while tokio::time::Instant::now() < deadline {
                let key = format!("w{w}-{i}");
                let c = cluster.read().await;
                let leader = c.wait_leader().await;
                let result = c
                    .node(leader)
                    .raft()
                    .client_write(kv(format!("put {key} {i}")))
                    .await;
                drop(c);
                if let Ok(r) = result {
                    assert_eq!(r.data, Response::Reply(b"OK".to_vec()));
                    acked.push((key, i, r.log_id.index));
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let mut c = cluster.write().await;
        let leader = c.wait_leader().await;
        tracing::info!(leader, "stopping the leader");
        c.stop(leader).await;
    }
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    let c = cluster.read().await;
    let last = acked
        .iter()
        .map(|a| a.2)
        .max()
        .expect("some writes were acknowledged");
    c.wait_applied(last).await;
    tracing::info!(
        acked = acked.len(),
        "every acknowledged write is on every surviving node"
    );
    for node in c.nodes.iter().flatten() {
        for (key, i, _) in &acked {
            let v = node
                .state()
                .query("kv", format!("get {key}").into_bytes())
                .await;
            assert_eq!(
                v.as_deref(),
                Ok(i.to_string().as_bytes()),
                "node {} lost {key}",
                node.id()
            );
        }
    }
    c.assert_identical().await;
}
