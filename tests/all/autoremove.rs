//! Opt-in removal of unreachable voters: a voter gone for longer than the policy says is
//! removed by the leader, one at a time, never below the floor, and the cluster keeps working.

use crate::support::cluster::{TestCluster, kv, test_settings};
use std::collections::BTreeSet;
use std::time::Duration;
use waft::autoremove::RemovalPolicy;
use waft::node::Node;
use waft::types::NodeId;
use waft_testkit::guests::EXAMPLE_KV;

fn voters(node: &Node) -> BTreeSet<NodeId> {
    node.metrics()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// How long the leader has not heard from `id` (None: never heard from it).
fn silent_for(leader: &Node, id: NodeId) -> Option<Duration> {
    leader
        .metrics()
        .heartbeat?
        .get(&id)?
        .as_ref()
        .map(|t| openraft::Instant::elapsed(&**t))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_gone_for_good_is_removed_but_never_below_the_floor() {
    let after = Duration::from_millis(1500);
    let mut settings = test_settings();
    settings.remove_unreachable = Some(RemovalPolicy {
        after,
        min_voters: 3,
    });
    let mut cluster = TestCluster::start(4, settings).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    cluster.write(kv("put before 1")).await;
    // All four answer: nobody is removed, however long we look.
    let leader = cluster.wait_leader().await;
    tokio::time::sleep(after * 2).await;
    assert_eq!(
        voters(cluster.node(leader)).len(),
        4,
        "a healthy voter was removed"
    );

    // One follower goes away for good: the leader removes it.
    let gone = (leader + 1) % 4;
    cluster.stop(gone).await;
    let mut removed = false;
    for _ in 0..300 {
        let leader = cluster.wait_leader().await;
        let v = voters(cluster.node(leader));
        if !v.contains(&(gone as NodeId)) {
            assert_eq!(v.len(), 3, "only the unreachable voter goes: {v:?}");
            let m = cluster.node(leader).metrics();
            assert!(
                m.membership_config
                    .membership()
                    .get_node(&(gone as NodeId))
                    .is_none(),
                "a removed voter is not kept as a learner"
            );
            removed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(removed, "the unreachable voter was never removed");
    let (index, _) = cluster.write(kv("put after 1")).await;

    // A second follower goes away: three voters is the floor, so it stays a voter, and the
    // two left still make a majority of three.
    let leader = cluster.wait_leader().await;
    let second = (0..4)
        .find(|i| *i != leader && *i != gone)
        .expect("a follower");
    cluster.stop(second).await;
    // Until the leader has seen it silent for well past the policy's time (bounded, in case
    // leadership moved and the new leader counts from its own start).
    for _ in 0..100 {
        let leader = cluster.wait_leader().await;
        if silent_for(cluster.node(leader), second as NodeId).is_some_and(|s| s > after * 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = cluster.wait_leader().await;
    assert!(
        voters(cluster.node(leader)).contains(&(second as NodeId)),
        "the policy went below its floor of three voters"
    );
    let (index2, _) = cluster.write(kv("put during 1")).await;
    assert!(index2 > index);

    // The second one comes back and catches up; the replicas agree.
    cluster.restart(second).await;
    cluster.wait_applied(index2).await;
    let state = cluster.assert_identical().await;
    assert!(!state.is_empty());
    cluster.shutdown().await;
}
