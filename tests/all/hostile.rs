//! Hostile and buggy guests deployed to a live cluster: the cluster stays up and consistent,
//! the client gets a clear error, and the other services never notice.

use crate::support::cluster::{TestCluster, test_settings};
use std::time::Duration;
use waft::node::RaftSettings;
use waft::pb::api::{self, waft_client::WaftClient};
use waft_testkit::guests::{EXAMPLE_KV, TEST_HOSTILE, TEST_NONDET};

async fn client(addr: &str) -> WaftClient<tonic::transport::Channel> {
    WaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX)
}

async fn deploy(addr: &str, service: &str, path: &str, fuel: u64, memory: u64) {
    let module = waft_testkit::wasm(path);
    let header = api::DeployHeader {
        service: service.into(),
        size: module.len() as u64,
        dry_run: false,
        fuel_per_apply: fuel,
        max_memory_bytes: memory,
        ..Default::default()
    };
    client(addr)
        .await
        .deploy(futures::stream::iter(waft::pb::deploy_chunks_with(
            header, &module,
        )))
        .await
        .unwrap_or_else(|e| panic!("deploy {service}: {e}"));
}

/// The outcome of a submit as text: `Ok(reply)`, or `Err("rejected: ..."/"trapped: ...")`.
async fn submit(addr: &str, service: &str, cmd: &str) -> Result<String, String> {
    use api::submit_reply::Outcome;
    let r = client(addr)
        .await
        .submit(api::SubmitRequest {
            service: service.into(),
            payload: cmd.as_bytes().to_vec(),
            client_id: 0,
            sequence: 0,
        })
        .await
        .map_err(|s| format!("status {:?}: {}", s.code(), s.message()))?
        .into_inner();
    match r.outcome {
        Some(Outcome::Ok(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Some(Outcome::Rejected(m)) => Err(format!("rejected: {m}")),
        Some(Outcome::Trapped(m)) => Err(format!("trapped: {m}")),
        None => Err("no outcome".into()),
    }
}

async fn query(addr: &str, service: &str, q: &str) -> Result<String, String> {
    use api::query_reply::Outcome;
    let r = client(addr)
        .await
        .query(api::QueryRequest {
            service: service.into(),
            payload: q.as_bytes().to_vec(),
            consistency: api::Consistency::Stale as i32,
        })
        .await
        .map_err(|s| format!("status {:?}: {}", s.code(), s.message()))?
        .into_inner();
    match r.outcome {
        Some(Outcome::Ok(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Some(Outcome::Rejected(m)) => Err(format!("rejected: {m}")),
        Some(Outcome::Trapped(m)) => Err(format!("trapped: {m}")),
        None => Err("no outcome".into()),
    }
}

fn expect_err(r: Result<String, String>, parts: &[&str]) -> String {
    let e = r.expect_err("an error");
    for p in parts {
        assert!(e.contains(p), "{e:?} should mention {p:?}");
    }
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_guests_on_a_live_cluster_get_clear_errors_and_change_nothing() {
    let settings = RaftSettings {
        snapshot_every: 40,
        keep_after_snapshot: 5,
        ..test_settings()
    };
    let cluster = TestCluster::start(3, settings).await;
    cluster.form().await;
    let a = cluster.addrs.clone();
    deploy(&a[0], "kv", EXAMPLE_KV, 0, 0).await;
    deploy(&a[1], "evil", TEST_HOSTILE, 50_000_000, 64 << 20).await;
    assert_eq!(submit(&a[2], "evil", "set a 1").await, Ok("OK".into()));
    assert_eq!(submit(&a[0], "kv", "put k before").await, Ok("OK".into()));

    tracing::info!("an endless loop runs out of fuel");
    expect_err(submit(&a[1], "evil", "loop").await, &["trapped", "fuel"]);
    tracing::info!("a memory bomb hits the service's memory limit");
    expect_err(submit(&a[2], "evil", "bomb").await, &["trapped", "memory"]);
    tracing::info!("a panic after a partial mutation is rolled back");
    expect_err(
        submit(&a[0], "evil", "panic-after-set a 2").await,
        &["trapped", "panic"],
    );
    tracing::info!(
        "a guest that breaks the contract (mutates, then rejects) is taken at its word, the same \
         way on every node: `err` is trusted to mean nothing changed, and no rollback is paid for it"
    );
    expect_err(
        submit(&a[0], "evil", "reject-after-set b 3").await,
        &["rejected"],
    );
    tracing::info!("a reply over the cap is refused, the call undone");
    expect_err(submit(&a[1], "evil", "huge 6000000").await, &["reply"]);
    tracing::info!("a chatty guest is fine (its output is capped, never fatal)");
    assert_eq!(submit(&a[1], "evil", "log 20000").await, Ok("OK".into()));
    tracing::info!("a query that loops runs out of fuel; the node keeps answering");
    // The query is a stale read on node 2: wait until it has applied everything so far (it
    // may still be compiling the deploy on a busy machine, and answer "no service").
    let (caught_up, _) = cluster
        .write(crate::support::cluster::kv("put k before"))
        .await;
    cluster.wait_applied(caught_up).await;
    expect_err(query(&a[2], "evil", "loop").await, &["trapped", "fuel"]);

    tracing::info!("after all that, every node has a=1 (b=3) and kv is untouched");
    let (last, _) = cluster
        .write(crate::support::cluster::kv("put k after"))
        .await;
    cluster.wait_applied(last).await;
    for addr in &a {
        assert_eq!(query(addr, "evil", "get a").await, Ok("1".into()));
        assert_eq!(query(addr, "evil", "get b").await, Ok("3".into()));
        assert_eq!(query(addr, "kv", "get k").await, Ok("after".into()));
    }
    cluster.assert_identical().await;

    tracing::info!("a guest whose snapshot traps: snapshots keep failing, the cluster keeps going");
    assert_eq!(
        submit(&a[0], "evil", "set trap-on-snapshot yes").await,
        Ok("OK".into())
    );
    let mut last = 0;
    for i in 0..120 {
        let (index, _) = cluster
            .write(crate::support::cluster::kv(format!("put n{i} {i}")))
            .await;
        last = index;
    }
    cluster.wait_applied(last).await;
    for node in cluster.nodes.iter().flatten() {
        assert!(
            node.metrics().running_state.is_ok(),
            "node {} still runs",
            node.id()
        );
    }
    for addr in &a {
        assert_eq!(query(addr, "kv", "get n119").await, Ok("119".into()));
    }
    tracing::info!(
        "snapshots were still taken (the guest's state kept as checkpoint + journal): a node \
         restarted from one has the same state"
    );
    let mut cluster = cluster;
    let follower = (cluster.wait_leader().await + 1) % 3;
    let snap = cluster.node(follower).metrics().snapshot;
    assert!(
        snap.is_some_and(|s| s.index > 40),
        "a snapshot was built: {snap:?}"
    );
    cluster.stop(follower).await;
    cluster.restart(follower).await;
    let (last, _) = cluster
        .write(crate::support::cluster::kv("put k restarted"))
        .await;
    cluster.wait_applied(last).await;
    let f = cluster.addrs[follower].clone();
    assert_eq!(query(&f, "evil", "get a").await, Ok("1".into()));
    assert_eq!(
        query(&f, "evil", "get trap-on-snapshot").await,
        Ok("yes".into())
    );
    assert_eq!(query(&f, "kv", "get n100").await, Ok("100".into()));
    let audit = cluster
        .node(cluster.wait_leader().await)
        .audit()
        .await
        .expect("audit");
    cluster.wait_applied(audit.report_index).await;
    for node in cluster.nodes.iter().flatten() {
        assert!(node.state().audit_status().divergences.is_empty());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_reading_clocks_and_randomness_stays_identical_on_every_node() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let a = cluster.addrs.clone();
    deploy(&a[0], "nondet", TEST_NONDET, 0, 0).await;
    let mut replies = Vec::new();
    for i in 0..20 {
        let r = submit(&a[i % 3], "nondet", &format!("cmd{i}"))
            .await
            .expect("applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
        replies.push(r);
    }
    let (last, _) = cluster.write(crate::support::cluster::kv("put x 1")).await;
    cluster.wait_applied(last).await;
    let states = cluster.assert_identical().await;
    let record = String::from_utf8_lossy(&states["nondet"]).into_owned();
    assert_eq!(record.lines().count(), 20);
    assert_eq!(record.lines().last(), replies.last().map(String::as_str));
    let audit = cluster
        .node(cluster.wait_leader().await)
        .audit()
        .await
        .expect("audit");
    cluster.wait_applied(audit.report_index).await;
    for node in cluster.nodes.iter().flatten() {
        let s = node.state().audit_status();
        assert_eq!(s.checks, 1);
        assert!(s.divergences.is_empty());
    }
    cluster.shutdown().await;
}

/// A guest call holds the state machine for as long as it runs (here an endless loop until
/// its fuel runs out; a deploy compiling a large component did the same for seconds). What
/// async code reads of the state (applied index, services, audit status, metrics) must not
/// wait for it: a runtime worker blocked on the state machine's lock froze a follower, its
/// leader's heartbeat streams were reset one by one, HTTP/2 closed the connection for too many
/// resets, replication stream included, and a deploy under load cost elections (issue 18).
/// Before the fix, these reads returned only after the call.
///
/// Independent of the machine's speed: the proof that the reads did not wait is that they
/// returned while the call still ran and saw the state from before it (had they waited, they
/// would see it applied). A loop that ends before the reads return proves nothing either way,
/// so the test tries again with four times the fuel, up to four times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_the_node_state_never_wait_for_a_running_guest_call() {
    use waft::types::{Request, Response};
    let cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    let addr = cluster.addrs[0].clone();
    let node = cluster.node(0);
    let mut tried = Vec::new();
    let mut fuel: u64 = 2_000_000_000;
    let proved = loop {
        if tried.len() == 4 {
            break false;
        }
        let service = format!("evil{}", tried.len());
        deploy(&addr, &service, TEST_HOSTILE, fuel, 0).await;
        let before = node.state().last_applied().map_or(0, |l| l.index);
        let raft = node.raft().clone();
        let looping = tokio::spawn(async move {
            raft.client_write(Request::Command {
                service,
                payload: b"loop".to_vec(),
                client: None,
                timestamp_ms: 1,
            })
            .await
        });
        // The loop's entry is committed, not yet applied: its apply is running (or about to).
        let entry = before + 1;
        node.raft()
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.local_committed.is_some_and(|c| c.index >= entry),
                "the loop's entry is committed",
            )
            .await
            .expect("committed");
        // Give the apply a moment to take the lock (it holds it for the whole loop). On a
        // machine too slow for that, the reads prove less, but never fail.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let state = node.state().clone();
        let reads = tokio::task::spawn_blocking(move || {
            (
                state.last_applied(),
                state.services().len(),
                state.audit_status().checks,
                state.service_metrics().len(),
                state.snapshot_stats().built,
            )
        })
        .await
        .expect("reads");
        let still_running = !looping.is_finished();
        let written = looping.await.expect("join").expect("the write commits");
        assert!(
            matches!(&written.data, Response::Trapped(m) if m.contains("fuel")),
            "{:?}",
            written.data
        );
        // After the call, the published view has caught up.
        assert!(
            node.state()
                .last_applied()
                .is_some_and(|l| l.index >= entry)
        );
        if still_running && reads.0.is_some_and(|l| l.index < entry) {
            assert_eq!(
                reads.1,
                tried.len() + 1,
                "the service list is there: {reads:?}"
            );
            break true;
        }
        tracing::info!(
            fuel,
            "the loop ended before the reads returned; again with more fuel"
        );
        tried.push(fuel);
        fuel *= 4;
    };
    assert!(
        proved,
        "the reads of the node's state returned only after the guest call ended, every time \
         (loops of {tried:?} fuel): they wait for a running guest call"
    );
    cluster.shutdown().await;
}
