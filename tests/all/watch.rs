//! The client API's Watch on an in-process cluster: every applied command in order, resuming
//! from an index, and a watch from before the kept history.

use crate::api::{kv_cluster, submit, waft};
use crate::support::cluster::{TestCluster, kv, test_settings};
use std::time::Duration;
use waft::pb::api;
use waft_testkit::guests::EXAMPLE_KV;

/// The next `n` events of a watch stream.
async fn next_events(
    stream: &mut tonic::Streaming<api::WatchEvent>,
    n: usize,
) -> Vec<api::WatchEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("an event within 20 s")
            .expect("the stream goes on")
            .expect("an event");
        out.push(e);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_see_every_applied_command_in_order_and_resume_from_an_index() {
    use api::watch_event::Outcome;
    let (cluster, leader, follower) = kv_cluster().await;
    // Every node has applied the deploy: a watch "from now" starts after it everywhere.
    let deployed = cluster
        .node(leader)
        .metrics()
        .last_log_index
        .expect("a log");
    cluster.wait_applied(deployed).await;
    // A watch of kv on a follower from now, and one of every service on the leader.
    let mut on_follower = waft(&follower)
        .await
        .watch(api::WatchRequest {
            service: "kv".into(),
            start_index: 0,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut everything = waft(&cluster.addrs[leader])
        .await
        .watch(api::WatchRequest::default())
        .await
        .expect("watch all")
        .into_inner();
    let mut w = waft(&cluster.addrs[leader]).await;
    let mut indexes = Vec::new();
    for cmd in ["put a 1", "put b 2", "frobnicate", "put a 3"] {
        let r = w
            .submit(submit("kv", cmd, 0, 0))
            .await
            .expect("submit")
            .into_inner();
        indexes.push(r.index);
    }
    // Another service's commands are not in kv's stream.
    cluster
        .deploy(
            "counter",
            waft_testkit::wasm(waft_testkit::guests::EXAMPLE_COUNTER),
        )
        .await;
    let r = w
        .submit(submit("kv", "put c 4", 0, 0))
        .await
        .expect("submit")
        .into_inner();
    indexes.push(r.index);

    let seen = next_events(&mut on_follower, 5).await;
    assert_eq!(
        seen.iter().map(|e| e.index).collect::<Vec<_>>(),
        indexes,
        "kv's commands, in log order"
    );
    assert!(seen.iter().all(|e| e.service == "kv"));
    assert_eq!(seen[0].payload, b"put a 1");
    assert_eq!(seen[0].outcome, Some(Outcome::Reply(b"OK".to_vec())));
    assert!(
        matches!(&seen[2].outcome, Some(Outcome::Rejected(m)) if m.contains("frobnicate")),
        "{:?}",
        seen[2]
    );
    assert!(seen[0].timestamp_ms > 0);
    let all = next_events(&mut everything, 6).await;
    assert_eq!(all[4].service, "counter");
    assert_eq!(all[4].outcome, Some(Outcome::Version(1)));
    assert!(all[4].payload.is_empty());

    // From an index in the past: replayed from the history, then live.
    let mut replay = waft(&cluster.addrs[(leader + 2) % 3])
        .await
        .watch(api::WatchRequest {
            service: "kv".into(),
            start_index: indexes[1],
            ..Default::default()
        })
        .await
        .expect("watch from an index")
        .into_inner();
    let again = next_events(&mut replay, 4).await;
    assert_eq!(
        again,
        seen[1..].to_vec(),
        "the same events on another replica"
    );
    let r = w
        .submit(submit("kv", "put d 5", 0, 0))
        .await
        .expect("submit")
        .into_inner();
    let live = next_events(&mut replay, 1).await;
    assert_eq!(live[0].index, r.index);

    // A node that stops ends its watches, saying where to resume: they do not hang, and
    // neither does the node's shutdown.
    let mut cluster = cluster;
    let replica = (leader + 2) % 3;
    cluster.stop(replica).await;
    let end = tokio::time::timeout(Duration::from_secs(20), replay.message())
        .await
        .expect("the watch ended")
        .expect_err("with an error");
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end}");
    assert!(
        end.message().contains("watch another node from index"),
        "{end}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_from_before_the_kept_history_is_out_of_range_and_the_cli_follows() {
    use crate::support::waft_cli;
    fn small_history(c: &mut waft::node::NodeConfig) {
        c.watch_history.events = 5;
        c.api.max_watches = 2;
    }
    let cluster = TestCluster::start_with(1, test_settings(), small_history).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let mut first = 0;
    for i in 0..10 {
        let (index, _) = cluster.write(kv(format!("put k{i} {i}"))).await;
        if i == 0 {
            first = index;
        }
    }
    let addr = cluster.addrs[0].clone();
    let e = waft(&addr)
        .await
        .watch(api::WatchRequest {
            service: "kv".into(),
            start_index: first,
            ..Default::default()
        })
        .await
        .expect_err("out of range");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    assert!(e.message().contains("history starts at index"), "{e}");

    // The CLI: the last five, replayed, as JSON lines.
    let o = waft_cli(&[
        "--endpoint",
        &addr,
        "--output",
        "json",
        "watch",
        "--service",
        "kv",
        "--from",
        &(first + 5).to_string(),
        "--count",
        "5",
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["index"], first + 5);
    assert_eq!(lines[0]["payload"], "put k5 5");
    assert_eq!(lines[4]["reply"], "OK");
    let o = waft_cli(&[
        "--endpoint",
        &addr,
        "watch",
        "--service",
        "kv",
        "--from",
        &first.to_string(),
    ])
    .await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no longer kept"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Two watches at most on this node: a third is refused until one ends.
    let open = || async { waft(&addr).await.watch(api::WatchRequest::default()).await };
    let one = open().await.expect("first watch");
    let _two = open().await.expect("second watch");
    let e = open().await.expect_err("over the limit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    drop(one);
    let mut again = None;
    for _ in 0..100 {
        // The ended watch gives its place back once its task sees the client gone.
        match open().await {
            Ok(w) => {
                again = Some(w);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(again.is_some(), "a place was given back");
    cluster.shutdown().await;
}
