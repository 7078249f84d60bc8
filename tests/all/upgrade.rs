//! Cluster versions (`waft::version`, `waft::upgrade`) on `waft node` processes. This build is
//! the first release, so the nodes of "the next release" are played with the hidden
//! `--cluster-versions 1-2` (a build that runs cluster versions 1 and 2); the others run this
//! build's range, 1. A mixed cluster stays at version 1 and says which node holds it there; a
//! finalize while a member is down is refused naming it; once every member runs 2 the version
//! rises (by `waft cluster finalize-upgrade`, or by the leader itself), every node applies it
//! and a node of the old build refuses to run with the cluster, as does a build too new to read
//! version 2, whether it restarts on its data or joins afresh.

use crate::support::procs::ProcCluster;
use crate::support::waft_cli;
use std::time::Duration;
use waft::pb::api;
use waft_testkit::guests::EXAMPLE_KV;

/// Node `i`'s status with every member's build and range.
async fn members(c: &ProcCluster, i: usize) -> api::StatusReply {
    let mut cl = c.cluster_client(i).await.expect("connect");
    cl.status(api::StatusRequest {
        member_versions: true,
    })
    .await
    .expect("status")
    .into_inner()
}

/// Waits until every running node in `nodes` has applied cluster version `v`.
async fn wait_version(c: &ProcCluster, nodes: &[usize], v: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for &i in nodes {
        loop {
            let now = c.status(i).await.map(|s| s.cluster_version);
            if now == Some(v) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {} never reached cluster version {v} (at {now:?})",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `waft cluster finalize-upgrade --output json` through node `i`: exit success, stdout, stderr.
async fn finalize(c: &ProcCluster, i: usize) -> (bool, String, String) {
    let o = waft_cli(&[
        "--endpoint",
        &c.addrs[i],
        "--output",
        "json",
        "cluster",
        "finalize-upgrade",
    ])
    .await;
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

async fn put(c: &ProcCluster, n: u64) {
    let out = crate::chaos::determinism::submit(
        &c.addrs,
        "kv",
        format!("put up{n} {n}").as_bytes(),
        0x06,
        n,
    )
    .await;
    assert!(
        matches!(out, Some(api::submit_reply::Outcome::Ok(_))),
        "write {n}: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_cluster_keeps_its_version_until_every_member_runs_the_new_one() {
    crate::support::init_tracing();
    let mut c = ProcCluster::unformed(3, &["--manual-finalize"]).await;
    // Nodes 1 and 2 run "the next release"; node 3 the current one.
    c.add_node_args(0, &["--cluster-versions", "1-2"]);
    c.add_node_args(1, &["--cluster-versions", "1-2"]);
    for i in 0..3 {
        c.spawn(i, None);
    }
    c.form().await;
    c.deploy("kv", EXAMPLE_KV).await;
    put(&c, 1).await;

    // Each node says what it runs; the cluster runs 1.
    let s = members(&c, 0).await;
    assert_eq!(s.cluster_version, 1);
    assert_eq!((s.runs_oldest, s.runs_newest), (1, 2));
    let ranges: Vec<(u64, u32, u32)> = s
        .members
        .iter()
        .map(|m| (m.id, m.runs_oldest, m.runs_newest))
        .collect();
    assert_eq!(ranges, vec![(1, 1, 2), (2, 1, 2), (3, 1, 1)]);
    let text = waft_cli(&["--endpoint", &c.addrs[2], "cluster", "status"]).await;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("cluster version: 1 (this build runs cluster version 1)"),
        "{text}"
    );
    assert!(text.contains("runs cluster versions 1 to 2"), "{text}");

    // Finalizing raises nothing while node 3 runs only 1, and says so (through a follower:
    // the call goes to the leader).
    let l = c.leader().await.expect("a leader");
    let (ok, out, err) = finalize(&c, (l + 1) % 3).await;
    assert!(ok, "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(reply["cluster_version"], 1, "{reply}");
    assert_eq!(reply["index"], 0, "{reply}");
    assert_eq!(reply["newest_already"], serde_json::json!([3]), "{reply}");

    // Node 3 is upgraded: stop, "swap the binary", start. Writes go on meanwhile.
    c.kill(2);
    put(&c, 2).await;
    c.set_node_args(2, &["--cluster-versions", "1-2"]);
    c.spawn(2, None);
    put(&c, 3).await;

    // A finalize while a member is down is refused, naming it, and changes nothing.
    c.kill(1);
    let up = c
        .wait_leader(Duration::from_secs(30))
        .await
        .expect("leader");
    let (ok, _, err) = finalize(&c, up).await;
    assert!(!ok, "a finalize with node 2 down must fail");
    assert!(err.contains("node 2 ("), "{err}");
    assert!(err.contains("did not answer"), "{err}");
    assert_eq!(c.status(up).await.expect("status").cluster_version, 1);
    c.spawn(1, None);

    // Every member answers and runs 2: the version rises, on every node.
    let raised = loop {
        let (ok, out, err) = finalize(&c, 0).await;
        if ok {
            let reply: serde_json::Value = serde_json::from_str(&out).expect("json");
            if reply["cluster_version"] == 2 {
                break reply;
            }
        } else {
            // Node 2 may still be starting: a member that does not answer holds it.
            assert!(err.contains("did not answer"), "{err}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(raised["previous"], 1, "{raised}");
    assert!(raised["index"].as_u64().expect("index") > 0, "{raised}");
    wait_version(&c, &[0, 1, 2], 2).await;
    put(&c, 4).await;

    // Node 3 goes back to the old build (it runs only 1): it refuses to run with the cluster
    // and says why, rather than misread what the others now write.
    c.kill(2);
    c.set_node_args(2, &[]);
    c.spawn(2, None);
    let exited = c.wait_exited(2, Duration::from_secs(120)).await;
    assert!(
        exited.is_some_and(|s| !s.success()),
        "a node of a build that does not run the cluster's version must stop: {exited:?}\n{}",
        c.log_tail(2, 20)
    );
    let log = c.log(2);
    assert!(
        log.contains("the cluster runs cluster version 2, and this build")
            && log.contains("runs cluster version 1"),
        "{}",
        c.log_tail(2, 20)
    );

    // A build too new to read version 2 (it runs 3 only) that joins afresh in node 3's place
    // is refused before the cluster changes.
    std::fs::remove_dir_all(c.data_dir(2)).expect("wipe node 3");
    c.set_node_args(2, &["--cluster-versions", "3"]);
    let seed = c.addrs[0].clone();
    c.spawn_with(2, None, &["--join", &seed]);
    let exited = c.wait_exited(2, Duration::from_secs(120)).await;
    assert!(
        exited.is_some_and(|s| !s.success()),
        "{exited:?}\n{}",
        c.log_tail(2, 20)
    );
    let log = c.log(2);
    assert!(log.contains("no longer reads"), "{}", c.log_tail(2, 20));
    let s = members(&c, 0).await;
    assert_eq!(
        s.members.len(),
        3,
        "the cluster still lists node 3 as it was"
    );

    // Node 3 on the new build again: it catches up and the replicas agree.
    c.set_node_args(2, &["--cluster-versions", "1-2"]);
    c.spawn_with(2, None, &["--join", &seed]);
    put(&c, 5).await;
    let (_, last) = crate::chaos::determinism::last_index(&c).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while c.status(2).await.is_none_or(|s| s.applied_index < last) {
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 never applied {last}:\n{}",
            c.log_tail(2, 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_version(&c, &[0, 1, 2], 2).await;
    crate::chaos::determinism::audit_equal(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_raises_the_version_once_every_member_runs_it() {
    crate::support::init_tracing();
    let mut c = ProcCluster::unformed(3, &[]).await;
    for i in 0..3 {
        c.add_node_args(i, &["--cluster-versions", "1-2"]);
        c.spawn(i, None);
    }
    c.form().await;
    // Without --manual-finalize the leader raises it by itself (it looks every few seconds).
    wait_version(&c, &[0, 1, 2], 2).await;
    // A restarted node reads the version back from its own data.
    c.kill(1);
    c.spawn(1, None);
    wait_version(&c, &[1], 2).await;
    let (ok, out, err) = finalize(&c, 1).await;
    assert!(ok, "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(reply["index"], 0, "nothing more to raise: {reply}");
    assert_eq!(
        reply["newest_already"],
        serde_json::json!([1, 2, 3]),
        "{reply}"
    );
}

/// Mid-upgrade to a release with another engine (played by a node whose checkpoint policy,
/// part of the engine fingerprint, differs): a deploy would stop that node at its entry, so
/// the leader refuses it, naming the node and both engines, and proposes nothing; once every
/// node runs one engine the same deploy goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_waits_until_every_member_runs_one_engine() {
    crate::support::init_tracing();
    let mut c = ProcCluster::unformed(3, &[]).await;
    c.add_node_args(2, &["--rebase-every", "7777"]);
    for i in 0..3 {
        c.spawn(i, None);
    }
    c.form().await;
    let engines: Vec<String> = {
        let mut e = Vec::new();
        for i in 0..3 {
            e.push(c.status(i).await.expect("status").engine);
        }
        e
    };
    assert_eq!(engines[0], engines[1]);
    assert_ne!(engines[0], engines[2], "node 3 plays another engine");
    let module = waft_testkit::wasm(EXAMPLE_KV);
    let path = c.data_dir(0).with_extension("kv.wasm");
    std::fs::write(&path, &module).expect("module file");
    let path = path.to_string_lossy().into_owned();
    let deploy = async |c: &ProcCluster| {
        waft_cli(&[
            "--endpoint",
            &c.addrs.join(","),
            "deploy",
            &path,
            "--service",
            "kv",
        ])
        .await
    };
    let o = deploy(&c).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "the deploy must be refused");
    assert!(err.contains("node 3 ("), "{err}");
    assert!(err.contains(&engines[2]), "{err}");
    assert!(err.contains(&engines[0]), "{err}");
    for i in 0..3 {
        assert!(c.running(i), "node {} still runs", i + 1);
        let mut w = waft::pb::api::waft_client::WaftClient::new(
            crate::support::procs::connect(&c.addrs[i])
                .await
                .expect("connect"),
        );
        let services = w
            .list_services(api::ListServicesRequest {})
            .await
            .expect("services")
            .into_inner()
            .services;
        assert!(services.is_empty(), "node {}: nothing deployed", i + 1);
    }
    // Node 3 "upgraded" to the others' engine: the deploy goes through.
    c.kill(2);
    c.set_node_args(2, &[]);
    c.spawn(2, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.status(2).await.is_none() {
        assert!(std::time::Instant::now() < deadline, "node 3 came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let o = deploy(&c).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    put(&c, 1).await;
    crate::chaos::determinism::audit_equal(&c).await;
}

/// A node restarted on a build with another engine (played by another checkpoint policy)
/// replays its log, the deploy its previous build applied included, instead of stopping at
/// that deploy as it does for a foreign engine's: no snapshot by hand before the restart. The
/// replicas still agree (the audit), and a deploy waits until the engines agree again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restarted_on_a_new_engine_replays_its_log() {
    crate::support::init_tracing();
    let mut c = ProcCluster::start(3, &[]).await;
    c.deploy("kv", EXAMPLE_KV).await;
    put(&c, 1).await;
    let before = c.status(2).await.expect("status").engine;
    c.kill(2);
    c.set_node_args(2, &["--rebase-every", "7777"]);
    c.spawn(2, None);
    put(&c, 2).await;
    let (_, last) = crate::chaos::determinism::last_index(&c).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while c.status(2).await.is_none_or(|s| s.applied_index < last) {
        assert!(
            c.running(2) && std::time::Instant::now() < deadline,
            "node 3 on its new engine never applied {last}:\n{}",
            c.log_tail(2, 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = c.status(2).await.expect("status").engine;
    assert_ne!(before, after, "node 3 runs another engine now");
    assert!(
        c.log(2)
            .contains("applying again a deploy that this node's previous build applied"),
        "{}",
        c.log_tail(2, 30)
    );
    crate::chaos::determinism::audit_equal(&c).await;
}

/// A backup taken at cluster version 2 may hold what a cluster still at 1 must not write: a
/// restore into such a cluster is refused in words and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_of_a_higher_cluster_version_is_not_restored() {
    crate::support::init_tracing();
    let mut newer = ProcCluster::unformed(1, &[]).await;
    newer.add_node_args(0, &["--cluster-versions", "1-2"]);
    newer.spawn(0, None);
    newer.form().await;
    wait_version(&newer, &[0], 2).await;
    newer.deploy("kv", EXAMPLE_KV).await;
    put(&newer, 1).await;
    let file = newer.data_dir(0).with_extension("backup");
    let file = file.to_string_lossy().into_owned();
    let o = waft_cli(&["--endpoint", &newer.addrs[0], "backup", &file]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let older = ProcCluster::start(1, &[]).await;
    let o = waft_cli(&["--endpoint", &older.addrs[0], "restore", &file]).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "the restore must be refused");
    assert!(
        err.contains("taken at cluster version 2 and this cluster runs 1"),
        "{err}"
    );
    let mut w = waft::pb::api::waft_client::WaftClient::new(
        crate::support::procs::connect(&older.addrs[0])
            .await
            .expect("connect"),
    );
    let services = w
        .list_services(api::ListServicesRequest {})
        .await
        .expect("services")
        .into_inner()
        .services;
    assert!(services.is_empty(), "nothing restored: {services:?}");
}
