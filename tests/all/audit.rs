//! Divergence detection: replicas compare state digests at the same log index, and a replica
//! whose state was damaged behind Raft's back is reported loudly (status, CLI, log).

use crate::cluster_support::{TestCluster, kv, test_settings};
use std::path::Path;
use std::time::Duration;
use waft::node::RaftSettings;
use waft::pb::api::{self, cluster_client::ClusterClient};
use waft::storage::snapshot;
use waft_testkit::guests::EXAMPLE_KV;

/// Rewrites one service's state inside a snapshot file, with a valid checksum: the damage a
/// bug, a bit flip under the checksum, or a nondeterministic guest would leave.
fn tamper_with_snapshot(path: &Path, service: &str) {
    let file = std::fs::File::open(path).expect("open snapshot");
    let mut reader = snapshot::Reader::open(file).expect("read snapshot");
    let mut header = reader.header.clone();
    let modules: Vec<Vec<u8>> = header
        .modules
        .iter()
        .map(|(_, len)| reader.section(*len).expect("module section"))
        .collect();
    let mut states: Vec<Vec<u8>> = header
        .services
        .iter()
        .map(|s| reader.section(s.state_len).expect("state section"))
        .collect();
    let i = header
        .services
        .iter()
        .position(|s| s.name == service)
        .expect("service in snapshot");
    // A state section is the guest's instance history: add a command nobody applied.
    let mut form: waft::runtime::ReplayForm =
        postcard::from_bytes(&states[i]).expect("a replay form");
    let last = form.journal.last().map_or(form.opened_at, |e| e.at);
    form.journal.push(waft::runtime::ReplayEntry {
        at: waft::runtime::ReplayPoint {
            index: last.index,
            ..last
        },
        call: waft::runtime::ReplayCall::Apply(serde_bytes::ByteBuf::from(
            b"put tampered yes".to_vec(),
        )),
    });
    states[i] = postcard::to_allocvec(&form).expect("encode");
    header.services[i].state_len = states[i].len() as u64;
    let modules: Vec<&[u8]> = modules.iter().map(Vec::as_slice).collect();
    let states: Vec<&[u8]> = states.iter().map(Vec::as_slice).collect();
    snapshot::write(path, &header, &modules, &states).expect("write snapshot");
}

async fn status(addr: &str) -> api::StatusReply {
    ClusterClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .status(api::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audits_match_on_healthy_replicas_and_flag_a_damaged_one() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    for i in 0..100 {
        cluster.write(kv(format!("put k{i} v{i}"))).await;
    }

    tracing::info!("an audit on a healthy cluster: every replica compares and matches");
    let leader = cluster.wait_leader().await;
    let outcome = waft::audit::audit_now(cluster.node(leader).raft())
        .await
        .expect("audit");
    assert_eq!(outcome.digest.services.len(), 1);
    assert_eq!(outcome.digest.services[0].name, "kv");
    cluster.wait_applied(outcome.report_index).await;
    for node in cluster.nodes.iter().flatten() {
        let a = node.state().audit_status();
        assert_eq!(a.checks, 1, "node {}", node.id());
        assert_eq!(a.last_checked_index, Some(outcome.digest.index));
        assert!(a.divergences.is_empty(), "node {}: {a:?}", node.id());
    }

    tracing::info!("damage node 2's state behind Raft's back: tamper with its snapshot, restart");
    let victim = (leader + 1) % 3;
    cluster
        .node(victim)
        .raft()
        .trigger()
        .snapshot()
        .await
        .expect("trigger snapshot");
    let applied = cluster
        .node(victim)
        .metrics()
        .last_applied
        .expect("applied")
        .index;
    cluster
        .node(victim)
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .snapshot(
            cluster
                .node(victim)
                .metrics()
                .last_applied
                .expect("applied"),
            "snapshot built",
        )
        .await
        .expect("snapshot built");
    assert!(applied > 100);
    cluster.stop(victim).await;
    tamper_with_snapshot(
        &cluster.dirs[victim].path().join("snapshots/current.snap"),
        "kv",
    );
    cluster.restart(victim).await;
    let (last, _) = cluster.write(kv("put after restart")).await;
    cluster.wait_applied(last).await;

    tracing::info!("the next audit flags node {victim} and only it");
    let leader = cluster.wait_leader().await;
    let outcome = waft::audit::audit_now(cluster.node(leader).raft())
        .await
        .expect("audit");
    cluster.wait_applied(outcome.report_index).await;
    for node in cluster.nodes.iter().flatten() {
        let a = node.state().audit_status();
        if node.id() as usize == victim {
            assert_eq!(a.divergences.len(), 1, "{a:?}");
            let d = &a.divergences[0];
            assert_eq!(d.index, outcome.digest.index);
            assert_eq!(d.what, "service kv");
            assert_ne!(d.local, d.leader);
        } else {
            assert!(a.divergences.is_empty(), "node {}: {a:?}", node.id());
            assert_eq!(a.last_checked_index, Some(outcome.digest.index));
        }
    }

    tracing::info!("status over gRPC and `waft cluster audit` show it");
    let s = status(&cluster.addrs[victim]).await;
    let audit = s.audit.expect("audit status");
    assert_eq!(audit.divergences.len(), 1);
    assert_eq!(audit.divergences[0].what, "service kv");
    let addr = cluster.addrs[leader].clone();
    let out = crate::support::waft_cli(&["--endpoint", &addr, "cluster", "audit"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a divergence fails the command: {text}"
    );
    let victim_line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{victim} ")))
        .unwrap_or_else(|| panic!("a line for node {victim}: {text}"));
    assert!(victim_line.contains("DIVERGED"), "{text}");
    assert_eq!(text.matches(" match ").count(), 2, "{text}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_audits_on_its_own_while_entries_arrive() {
    let settings = RaftSettings {
        audit_interval: Some(Duration::from_millis(200)),
        ..test_settings()
    };
    let cluster = TestCluster::start(3, settings).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    for i in 0..20 {
        cluster.write(kv(format!("put k{i} v{i}"))).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut checked = false;
    for _ in 0..100 {
        checked = cluster
            .nodes
            .iter()
            .flatten()
            .all(|n| n.state().audit_status().checks >= 1);
        if checked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        checked,
        "every replica compared at least one periodic audit"
    );
    for node in cluster.nodes.iter().flatten() {
        assert!(node.state().audit_status().divergences.is_empty());
    }
    tracing::info!("an idle cluster stops auditing: no entries, no new audit entries");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = cluster.node(0).metrics().last_log_index;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(cluster.node(0).metrics().last_log_index, before);
    cluster.shutdown().await;
}
