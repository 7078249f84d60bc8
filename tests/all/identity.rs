//! Cluster identity: Raft messages name their cluster and their target node, and a node refuses
//! messages for another node or from another cluster. Found by the chaos campaigns: a port
//! freed by a killed node was reused by another campaign's process, and a leader appended its
//! entries to a stranger, whose replicas then diverged.

use crate::support::channel;
use crate::support::cluster::{TestCluster, kv, test_settings};
use std::time::Duration;
use waft::node::{Node, NodeConfig};
use waft::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use waft::pb::raft::raft_client::RaftClient;
use waft::raft::identity::{CLUSTER_HEADER, TARGET_HEADER};
use waft::types::{NodeId, TypeConfig, Vote};

async fn status(addr: &str) -> api::StatusReply {
    ClusterClient::new(channel(addr).await)
        .status(api::StatusRequest::default())
        .await
        .expect("status")
        .into_inner()
}

/// A vote request for `target`, stamped with `cluster` (if any).
async fn vote(
    addr: &str,
    target: Option<NodeId>,
    cluster: Option<&str>,
) -> Result<(), tonic::Status> {
    let rpc = openraft::raft::VoteRequest::<TypeConfig>::new(Vote::new(1_000, 9), None);
    let mut req = tonic::Request::new(waft::pb::encode(&rpc).expect("encode"));
    if let Some(t) = target {
        req.metadata_mut()
            .insert(TARGET_HEADER, t.to_string().parse().expect("header"));
    }
    if let Some(c) = cluster {
        req.metadata_mut()
            .insert(CLUSTER_HEADER, c.parse().expect("header"));
    }
    RaftClient::new(channel(addr).await)
        .vote(req)
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_member_shares_one_cluster_id_and_refuses_strangers() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.write(kv("put a 1")).await;
    let id = cluster
        .node(0)
        .cluster_id()
        .expect("the initializing node made an id");
    assert_eq!(id.len(), 32);
    for (i, addr) in cluster.addrs.iter().enumerate() {
        assert_eq!(status(addr).await.cluster_id, id, "node {i}");
    }

    // Messages for another node id, or from another cluster, are refused before Raft sees them.
    let addr = cluster.addrs[1].clone();
    let before = cluster.node(1).metrics().vote;
    let e = vote(&addr, Some(2), Some(&id))
        .await
        .expect_err("wrong target");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("this is node 1, not node 2"), "{e}");
    let stranger = "0123456789abcdef0123456789abcdef";
    let e = vote(&addr, Some(1), Some(stranger))
        .await
        .expect_err("other cluster");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains(&format!("belongs to cluster {id}")),
        "{e}"
    );
    assert!(e.message().contains(stranger), "{e}");
    let e = vote(&addr, Some(1), Some("not-hex"))
        .await
        .expect_err("malformed");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert_eq!(
        cluster.node(1).metrics().vote,
        before,
        "a refused vote changed nothing"
    );

    // A forwarded client request from another cluster is refused too.
    let mut req = tonic::Request::new(api::SubmitRequest {
        service: "kv".into(),
        payload: b"put b 2".to_vec(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("waft-forwarded", stranger.parse().expect("header"));
    let e = WaftClient::new(channel(&addr).await)
        .submit(req)
        .await
        .expect_err("forwarded by a stranger");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");

    // The id survives a restart; a damaged id file stops the node with a clear error.
    cluster.stop(2).await;
    cluster.restart(2).await;
    assert_eq!(cluster.node(2).cluster_id(), Some(id.clone()));
    cluster.stop(2).await;
    std::fs::write(cluster.dirs[2].path().join("cluster-id"), "garbage\n").expect("write");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let e = Node::start(NodeConfig::new(2, cluster.dirs[2].path()), listener)
        .await
        .expect_err("refuses a damaged id");
    assert!(e.to_string().contains("does not hold a cluster id"), "{e}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_at_a_members_address_is_never_written_to() {
    // Cluster A loses node 2; a one-node cluster B starts on node 2's address, with the same
    // node id. A's leader keeps replicating to that address: B must refuse every message.
    // (Steady timings: a new leader of A would not know what node 2 acknowledged.)
    let mut a = TestCluster::start(3, crate::support::cluster::loaded_settings()).await;
    a.form().await;
    a.write(kv("put before 1")).await;
    let addr = a.addrs[2].clone();
    a.stop(2).await;
    let b_dir = tempfile::tempdir().expect("tempdir");
    // B has no cluster id until it initializes, and A's leader reaches it before that: B
    // holds no log, while A's leader knows node 2 acknowledged its entries, so B refuses
    // them (it does not adopt A's cluster).
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("bind A's old address");
    let mut config = NodeConfig::new(2, b_dir.path());
    config.raft = test_settings();
    let b = Node::start(config, listener).await.expect("B starts");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.cluster_id(), None, "B adopted A's cluster");
    assert_eq!(b.metrics().last_log_index, None, "B took A's entries");
    let mut members = std::collections::BTreeMap::new();
    members.insert(2, openraft::BasicNode { addr: addr.clone() });
    b.initialize(members).await.expect("B initializes");
    b.raft()
        .wait(Some(Duration::from_secs(10)))
        .current_leader(2, "B leads itself")
        .await
        .expect("B elects itself");
    let b_id = b.cluster_id().expect("B has an id");
    assert_ne!(Some(b_id.clone()), a.node(0).cluster_id());
    let b_log = b.metrics().last_log_index;

    // A keeps working with two of three, and sends B appends and heartbeats all along.
    for i in 0..30 {
        a.write(kv(format!("put k{i} {i}"))).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = b.metrics();
    assert_eq!(m.last_log_index, b_log, "B's log grew: A's entries got in");
    assert_eq!(m.current_leader, Some(2), "B followed A's leader");
    assert_eq!(
        m.membership_config
            .membership()
            .voter_ids()
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(b.cluster_id(), Some(b_id));
    b.shutdown().await.expect("B stops");
    a.shutdown().await;
}

/// A vote request for node `target` of `cluster` from a candidate whose log ends at `last`.
async fn vote_with_log(addr: &str, target: NodeId, last: Option<u64>) -> Result<(), tonic::Status> {
    let last = last.map(|index| {
        openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 0,
            },
            index,
        )
    });
    let rpc = openraft::raft::VoteRequest::<TypeConfig>::new(Vote::new(1_000, 0), last);
    let mut req = tonic::Request::new(waft::pb::encode(&rpc).expect("encode"));
    req.metadata_mut()
        .insert(TARGET_HEADER, target.to_string().parse().expect("header"));
    RaftClient::new(channel(addr).await)
        .vote(req)
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_lost_its_data_is_refused_until_it_is_added_back() {
    // Node 2's data directory is wiped and it starts again at its address with its id. It has
    // no log and no cluster id: it must not answer the leader as if it had never held entries
    // (openraft's leader asserts a follower never loses entries it acknowledged), and must not
    // vote as a member. The cluster goes on with two of three; removing node 2 and adding it
    // back brings it in again. (A new leader would not know what node 2 acknowledged to the
    // old one and would copy it the log from scratch, safely: steady timings keep one leader.)
    let mut cluster = TestCluster::start(3, crate::support::cluster::loaded_settings()).await;
    cluster.form().await;
    for i in 0..20 {
        cluster.write(kv(format!("put a{i} {i}"))).await;
    }
    let id = cluster.node(0).cluster_id().expect("cluster id");
    cluster.stop(2).await;
    cluster.dirs[2] = tempfile::tempdir().expect("tempdir");
    cluster.restart(2).await;

    for i in 0..20 {
        cluster.write(kv(format!("put b{i} {i}"))).await;
    }
    // Long enough for the leader to reopen its stream to node 2 several times.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (index, _) = cluster.write(kv("put c 1")).await;
    let wiped = cluster.node(2).metrics();
    assert_eq!(wiped.last_log_index, None, "the wiped node took entries");
    assert_eq!(cluster.node(2).cluster_id(), None);
    for i in 0..2 {
        let m = cluster.node(i).metrics();
        assert!(m.running_state.is_ok(), "node {i} stopped: {m:?}");
    }

    // It refuses to vote for a candidate with a log: it cannot tell what it has lost.
    let e = vote_with_log(&cluster.addrs[2], 2, Some(5))
        .await
        .expect_err("a wiped member votes");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("remove node 2"), "{e}");
    assert_eq!(
        cluster.node(2).metrics().vote.leader_id().term,
        0,
        "a refused vote changed nothing"
    );
    assert_eq!(cluster.node(2).cluster_id(), None);

    // Remove it and add it back: it catches up and joins the cluster.
    let leader = cluster.node(cluster.wait_leader().await);
    leader
        .raft()
        .change_membership([0, 1], false)
        .await
        .expect("remove node 2");
    leader
        .raft()
        .add_learner(
            2,
            openraft::BasicNode {
                addr: cluster.addrs[2].clone(),
            },
            true,
        )
        .await
        .expect("add node 2 back");
    leader
        .raft()
        .change_membership([0, 1, 2], false)
        .await
        .expect("node 2 votes again");
    let (last, _) = cluster.write(kv("put d 1")).await;
    assert!(last > index);
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    assert_eq!(cluster.node(2).cluster_id(), Some(id));
    cluster.shutdown().await;
}
