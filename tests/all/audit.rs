//! Divergence detection: replicas compare state digests at the same log index, and a replica
//! whose state was damaged behind Raft's back is reported loudly (status, CLI, log).

use crate::support::cluster::{TestCluster, kv, test_settings};
use std::path::Path;
use std::time::Duration;
use waft::node::RaftSettings;
use waft::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use waft::storage::snapshot;
use waft_testkit::guests::EXAMPLE_KV;

/// Rewrites a snapshot file with `change` applied to its header and service states (postcard
/// replay forms), with a valid checksum: the damage a bug, a bit flip under the checksum, or a
/// nondeterministic guest would leave.
fn rewrite_snapshot(
    path: &Path,
    change: impl FnOnce(&mut snapshot::SnapshotHeader, &mut Vec<Vec<u8>>),
) {
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
    change(&mut header, &mut states);
    for (record, state) in header.services.iter_mut().zip(&states) {
        record.state_len = state.len() as u64;
    }
    let modules: Vec<&[u8]> = modules.iter().map(Vec::as_slice).collect();
    let states: Vec<&[u8]> = states.iter().map(Vec::as_slice).collect();
    snapshot::write(path, &header, &modules, &states).expect("write snapshot");
}

/// Adds `command`, which nobody applied, to one service's history inside a snapshot file.
pub fn tamper_with_snapshot(path: &Path, service: &str, command: &str) {
    rewrite_snapshot(path, |header, states| {
        let i = header
            .services
            .iter()
            .position(|s| s.name == service)
            .expect("service in snapshot");
        let mut state: waft::storage::snapshot::ServiceState =
            postcard::from_bytes(&states[i]).expect("a service state");
        let form = &mut state.form;
        let last = form.journal.last().map_or(form.opened_at, |e| e.at);
        form.journal.push(waft::runtime::ReplayEntry {
            at: waft::runtime::ReplayPoint {
                index: last.index,
                ..last
            },
            call: waft::runtime::ReplayCall::Apply(serde_bytes::ByteBuf::from(
                command.as_bytes().to_vec(),
            )),
        });
        states[i] = postcard::to_allocvec(&state).expect("encode");
    });
}

async fn status(addr: &str) -> api::StatusReply {
    ClusterClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .status(api::StatusRequest::default())
        .await
        .expect("status")
        .into_inner()
}

/// Damages node `victim`'s kv state behind Raft's back: snapshot, stop, add `command` to the
/// service's history in the snapshot file, restart.
async fn damage(cluster: &mut TestCluster, victim: usize, command: &str) {
    damage_with(cluster, victim, |path| {
        tamper_with_snapshot(path, "kv", command)
    })
    .await;
}

/// Snapshots node `victim`, stops it, applies `tamper` to its snapshot file, restarts it.
async fn damage_with(cluster: &mut TestCluster, victim: usize, tamper: impl FnOnce(&Path)) {
    // The victim's snapshot must hold everything written so far: entries it re-applies after
    // the snapshot would repair part of the damage (a session re-created by a later write).
    // (The highest index in any node's log: after a leader change, the new leader may not
    // have applied the last writes yet.)
    let written = cluster
        .nodes
        .iter()
        .flatten()
        .filter_map(|n| n.metrics().last_log_index)
        .max()
        .expect("a log");
    cluster.wait_applied(written).await;
    let node = cluster.node(victim);
    let applied = node.metrics().last_applied.expect("applied").index;
    node.raft()
        .trigger()
        .snapshot()
        .await
        .expect("trigger snapshot");
    node.raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied),
            "snapshot built",
        )
        .await
        .expect("snapshot built");
    cluster.stop(victim).await;
    tamper(&cluster.dirs[victim].path().join("snapshots/current.snap"));
    cluster.restart(victim).await;
}

/// Writes `put wN N` through the nodes in turn until `stop`, retrying a failed write (same
/// client sequence: applied once) on the next node; returns the keys acknowledged.
async fn write_until(
    addrs: &[String],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(String, String)> {
    let mut acknowledged = Vec::new();
    let client_id = 0x5eed_u64;
    let mut seq = 0u64;
    let mut turn = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        seq += 1;
        let key = format!("w{seq}");
        for _attempt in 0..50 {
            turn += 1;
            let Ok(mut c) =
                WaftClient::connect(format!("http://{}", addrs[turn % addrs.len()])).await
            else {
                continue;
            };
            let r = c
                .submit(api::SubmitRequest {
                    service: "kv".into(),
                    payload: format!("put {key} {seq}").into_bytes(),
                    client_id,
                    sequence: seq,
                })
                .await;
            match r.map(tonic::Response::into_inner).map(|r| r.outcome) {
                Ok(Some(api::submit_reply::Outcome::Ok(_))) => {
                    acknowledged.push((key.clone(), seq.to_string()));
                    break;
                }
                Ok(other) => panic!("write {key} answered {other:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    acknowledged
}

/// A stale read of `key` on node `i`, over gRPC.
async fn stale_get(
    cluster: &TestCluster,
    i: usize,
    key: &str,
) -> Result<api::QueryReply, tonic::Status> {
    WaftClient::connect(format!("http://{}", cluster.addrs[i]))
        .await
        .expect("connect")
        .query(api::QueryRequest {
            service: "kv".into(),
            payload: format!("get {key}").into_bytes(),
            consistency: api::Consistency::Stale as i32,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn reply_text(r: &api::QueryReply) -> String {
    match &r.outcome {
        Some(api::query_reply::Outcome::Ok(b)) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    }
}

/// Writes and an audit until every running node has applied the votes entry.
async fn audit_and_wait(cluster: &TestCluster) -> waft::audit::AuditOutcome {
    let leader = cluster.wait_leader().await;
    let outcome = cluster.node(leader).audit().await.expect("audit");
    cluster.wait_applied(outcome.report_index).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_follower_is_found_and_rebuilt_from_the_majority() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    for i in 0..100 {
        cluster.write(kv(format!("put k{i} v{i}"))).await;
    }

    tracing::info!("an audit on a healthy cluster: every replica compares and matches");
    let outcome = audit_and_wait(&cluster).await;
    assert_eq!(outcome.digest.services.len(), 1);
    assert_eq!(outcome.digest.services[0].name, "kv");
    assert_eq!(
        outcome.votes.len(),
        3,
        "every member voted: {:?}",
        outcome.missing
    );
    for node in cluster.nodes.iter().flatten() {
        let a = node.state().audit_status();
        assert_eq!(a.checks, 1, "node {}", node.id());
        assert_eq!(a.last_checked_index, Some(outcome.digest.index));
        assert!(a.divergences.is_empty(), "node {}: {a:?}", node.id());
        assert!(a.heals.is_empty(), "node {}: {a:?}", node.id());
    }

    let leader = cluster.wait_leader().await;
    let victim = (leader + 1) % 3;
    tracing::info!("damage node {victim}'s state behind Raft's back");
    damage(&mut cluster, victim, "put tampered yes").await;
    let (last, _) = cluster.write(kv("put after restart")).await;
    cluster.wait_applied(last).await;
    assert_eq!(
        reply_text(&stale_get(&cluster, victim, "tampered").await.expect("read")),
        "yes",
        "the damage is there before the audit"
    );

    tracing::info!("the next audit finds node {victim} in the minority, and it heals");
    let outcome = audit_and_wait(&cluster).await;
    for node in cluster.nodes.iter().flatten() {
        let a = node.state().audit_status();
        if node.id() as usize == victim {
            assert_eq!(a.divergences.len(), 1, "{a:?}");
            let d = &a.divergences[0];
            assert_eq!(d.index, outcome.digest.index);
            assert_eq!(d.what, "service kv");
            assert!(d.majority, "{d:?}");
            assert_ne!(d.local, d.expected);
            assert_eq!(a.heals.len(), 1, "{a:?}");
            let h = &a.heals[0];
            assert_eq!(h.error, None, "{h:?}");
            assert_eq!(h.items, vec!["service kv".to_owned()]);
            assert_eq!(h.audit_index, outcome.digest.index);
            assert_eq!(h.at_index, outcome.report_index);
            assert!(h.source.is_some_and(|s| s as usize != victim), "{h:?}");
            assert!(a.unavailable.is_empty(), "{a:?}");
            assert_eq!((a.divergences_total, a.heals_total), (1, 1));
        } else {
            assert!(a.divergences.is_empty(), "node {}: {a:?}", node.id());
            assert!(a.heals.is_empty(), "node {}: {a:?}", node.id());
            assert_eq!(a.last_checked_index, Some(outcome.digest.index));
        }
    }
    let read = stale_get(&cluster, victim, "tampered").await.expect("read");
    assert_ne!(reply_text(&read), "yes", "the damage is gone");
    let (last, _) = cluster.write(kv("put after heal")).await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;

    tracing::info!("status over gRPC and `waft cluster audit` show the divergence and the heal");
    let s = status(&cluster.addrs[victim]).await;
    let audit = s.audit.expect("audit status");
    assert_eq!(audit.divergences.len(), 1);
    assert_eq!(audit.divergences[0].what, "service kv");
    assert_eq!(audit.heals.len(), 1);
    assert!(audit.heals[0].error.is_empty());
    let out =
        crate::support::waft_cli(&["--endpoint", &cluster.addrs[victim], "cluster", "status"])
            .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("healed service kv from node"), "{text}");

    tracing::info!("and the audit after that matches everywhere");
    let outcome = audit_and_wait(&cluster).await;
    let addr = cluster.addrs[cluster.wait_leader().await].clone();
    for node in cluster.nodes.iter().flatten() {
        let a = node.state().audit_status();
        assert_eq!(a.last_checked_index, Some(outcome.digest.index));
        assert_eq!(
            a.divergences.len(),
            usize::from(node.id() as usize == victim)
        );
    }
    let out = crate::support::waft_cli(&["--endpoint", &addr, "cluster", "audit"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(" match ").count(), 3, "{text}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_leader_hands_over_and_heals_while_writes_continue() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    for i in 0..30 {
        cluster.write(kv(format!("put k{i} v{i}"))).await;
    }
    let leader = cluster.wait_leader().await;
    let victim = (leader + 2) % 3;
    damage(&mut cluster, victim, "put tampered yes").await;
    tracing::info!("make the damaged node {victim} the leader");
    for attempt in 0..200 {
        let current = cluster.wait_leader().await;
        if current == victim {
            break;
        }
        if attempt % 20 == 0 {
            let _ = cluster
                .node(current)
                .raft()
                .trigger()
                .transfer_leader(victim as u64)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cluster.wait_leader().await,
        victim,
        "the damaged node leads"
    );

    tracing::info!("writes continue while the damaged leader audits, hands over and heals");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addrs = cluster.addrs.clone();
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move { write_until(&addrs, stop).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = cluster.node(victim).audit().await.expect("audit");
    cluster.wait_applied(outcome.report_index).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = writer.await.expect("writer");
    assert!(!acknowledged.is_empty());

    let a = cluster.node(victim).state().audit_status();
    assert_eq!(a.heals.len(), 1, "{a:?}");
    assert_eq!(a.heals[0].error, None, "{a:?}");
    assert_ne!(
        cluster.wait_leader().await,
        victim,
        "the damaged leader handed over"
    );
    let (last, _) = cluster.write(kv("put final yes")).await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    for node in cluster.nodes.iter().flatten() {
        let get = |key: &str| {
            let q = node.state().query("kv", format!("get {key}").into_bytes());
            async move { q.await.map(|r| String::from_utf8_lossy(&r).into_owned()) }
        };
        assert_ne!(
            get("tampered").await,
            Ok("yes".to_owned()),
            "node {}",
            node.id()
        );
        for (key, value) in &acknowledged {
            assert_eq!(
                get(key).await.as_ref(),
                Ok(value),
                "node {}: acknowledged {key} lost",
                node.id()
            );
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_cannot_heal_refuses_reads_until_a_later_audit_heals_it() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    cluster.write(kv("put k v")).await;
    let leader = cluster.wait_leader().await;
    let victim = (leader + 1) % 3;
    damage(&mut cluster, victim, "put tampered yes").await;
    tracing::info!("node {victim} cannot reach anyone to heal from");
    cluster.node(victim).state().set_healer(None);
    let outcome = audit_and_wait(&cluster).await;
    let a = cluster.node(victim).state().audit_status();
    assert_eq!(a.heals.len(), 1, "{a:?}");
    assert!(
        a.heals[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no network")),
        "{a:?}"
    );
    assert!(a.unavailable.contains_key("kv"), "{a:?}");
    let refused = stale_get(&cluster, victim, "k").await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("diverged at audit index")
            && refused
                .message()
                .contains(&outcome.digest.index.to_string()),
        "{}",
        refused.message()
    );
    let other = (victim + 1) % 3;
    assert_eq!(
        reply_text(&stale_get(&cluster, other, "k").await.expect("read")),
        "v"
    );
    let s = status(&cluster.addrs[victim]).await.audit.expect("audit");
    assert_eq!(s.unavailable.len(), 1);
    assert!(!s.heals[0].error.is_empty());

    tracing::info!("with its network back, the next audit heals it");
    let node = cluster.node(victim);
    node.state().set_healer(Some(std::sync::Arc::new(
        waft::raft::peer_audit::PeerHealer::with_raft(node.raft().clone(), node.network().clone()),
    )));
    audit_and_wait(&cluster).await;
    let a = cluster.node(victim).state().audit_status();
    assert_eq!(a.heals.len(), 2, "{a:?}");
    assert_eq!(a.heals[1].error, None, "{a:?}");
    assert!(a.unavailable.is_empty(), "{a:?}");
    assert_eq!(
        reply_text(&stale_get(&cluster, victim, "k").await.expect("read")),
        "v"
    );
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_majority_a_divergence_is_reported_and_nothing_changes() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    cluster.write(kv("put k v")).await;
    let leader = cluster.wait_leader().await;
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    tracing::info!("damage both followers, differently: three values, none with a majority");
    damage(&mut cluster, a, "put tampered a").await;
    damage(&mut cluster, b, "put tampered b").await;
    let (last, _) = cluster.write(kv("put more v")).await;
    cluster.wait_applied(last).await;
    audit_and_wait(&cluster).await;
    for node in cluster.nodes.iter().flatten() {
        let s = node.state().audit_status();
        assert!(s.heals.is_empty(), "node {}: {s:?}", node.id());
        assert!(s.unavailable.is_empty(), "node {}: {s:?}", node.id());
        assert!(
            s.divergences.iter().all(|d| !d.majority),
            "node {}: {s:?}",
            node.id()
        );
    }
    let current = cluster.wait_leader().await;
    for i in [a, b] {
        let s = cluster.node(i).state().audit_status();
        if i != current {
            assert_eq!(s.divergences.len(), 1, "node {i}: {s:?}");
        }
    }
    let text = reply_text(&stale_get(&cluster, a, "tampered").await.expect("read"));
    assert_eq!(text, "a", "nothing changed on node {a}");
    let text = reply_text(&stale_get(&cluster, b, "tampered").await.expect("read"));
    assert_eq!(text, "b", "nothing changed on node {b}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_session_table_and_a_service_the_majority_lacks_are_healed_too() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    for seq in 1..=5 {
        cluster
            .write(waft::types::Request::Command {
                service: "kv".into(),
                payload: format!("put s{seq} {seq}").into_bytes(),
                client: Some(waft::types::ClientSeq { client_id: 42, seq }),
                timestamp_ms: 1,
            })
            .await;
    }
    let leader = cluster.wait_leader().await;
    let victim = (leader + 1) % 3;
    tracing::info!("node {victim} gains a session and a service nobody made");
    damage_with(&mut cluster, victim, |path| {
        rewrite_snapshot(path, |header, states| {
            // A session for a client that never wrote: nothing in the log touches it, so the
            // damage stays whatever this node re-applies after its snapshot.
            assert!(!header.sessions.is_empty(), "client 42's session is there");
            let mut fake = header.sessions[0].1.clone();
            fake.seq = 7;
            header.sessions.push((999, fake));
            let mut extra = header.services[0].clone();
            extra.name = "stray".into();
            header.services.push(extra);
            states.push(states[0].clone());
        })
    })
    .await;
    let (last, _) = cluster.write(kv("put after damage")).await;
    cluster.wait_applied(last).await;
    assert_eq!(
        cluster.node(victim).state().services().len(),
        2,
        "the stray service is there"
    );

    let outcome = audit_and_wait(&cluster).await;
    assert_eq!(
        outcome.votes.len(),
        3,
        "every member voted: {:?}",
        outcome.missing
    );
    let a = cluster.node(victim).state().audit_status();
    let what: Vec<&str> = a.divergences.iter().map(|d| d.what.as_str()).collect();
    assert!(
        what.contains(&"sessions") && what.contains(&"service stray"),
        "{a:?}\nvotes: {:#?}",
        outcome.votes
    );
    assert_eq!(a.heals.len(), 1, "{a:?}");
    assert_eq!(a.heals[0].error, None, "{a:?}");
    let mut items = a.heals[0].items.clone();
    items.sort();
    assert_eq!(
        items,
        vec!["service stray".to_owned(), "sessions".to_owned()],
        "{a:#?}\nvotes: {:#?}",
        outcome.votes
    );
    assert_eq!(
        cluster.node(victim).state().services().len(),
        1,
        "the stray service is gone"
    );
    let (last, _) = cluster.write(kv("put after heal")).await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    let again = audit_and_wait(&cluster).await;
    assert!(again.digest.index > outcome.digest.index);
    for node in cluster.nodes.iter().flatten() {
        let s = node.state().audit_status();
        assert!(
            s.divergences.iter().all(|d| d.index < again.digest.index),
            "node {}: {s:?}",
            node.id()
        );
    }
    cluster.shutdown().await;
}
