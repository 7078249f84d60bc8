//! A replicated cluster: three in-process nodes over real gRPC, redb and the kv guest.

use crate::support::cluster::{TestCluster, kv, test_settings};
use std::time::Duration;
use waft::node::RaftSettings;
use waft::types::Response;
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

    tracing::info!("a retried command (same client id and sequence) is not applied twice");
    let with_client = |payload: &str, seq: u64| waft::types::Request::Command {
        service: "kv".to_owned(),
        payload: payload.as_bytes().to_vec(),
        client: Some(waft::types::ClientSeq {
            client_id: 0xC0FFEE,
            seq,
        }),
        timestamp_ms: 5,
    };
    let (_, first) = cluster
        .write(with_client("cas key0000 value-900 first", 1))
        .await;
    assert_eq!(first, Response::Reply(b"OK".to_vec()));
    let (_, retry) = cluster
        .write(with_client("cas key0000 value-900 first", 1))
        .await;
    assert_eq!(
        retry, first,
        "the retry gets the first answer, not a failed compare"
    );
    let (_, stale) = cluster.write(with_client("put key0000 stale", 0)).await;
    assert!(matches!(stale, Response::Rejected(m) if m.contains("older")));
    let (last, put) = cluster.write(kv("put x 1")).await;
    assert_eq!(put, Response::Reply(b"OK".to_vec()));
    let (last2, no_service) = cluster
        .write(waft::types::Request::Command {
            service: "nope".to_owned(),
            payload: b"put x 1".to_vec(),
            client: None,
            timestamp_ms: 5,
        })
        .await;
    assert_eq!(no_service, Response::NoSuchService("nope".to_owned()));
    cluster.wait_applied(last.max(last2)).await;
    for node in cluster.nodes.iter().flatten() {
        let v = node
            .state()
            .query("kv", b"get key0000".to_vec())
            .await
            .expect("query");
        assert_eq!(v, b"first");
    }
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

/// The leader's last snapshot index and last purged index.
async fn leader_snapshot_and_purged(cluster: &TestCluster) -> (u64, u64) {
    let m = cluster.node(cluster.wait_leader().await).metrics();
    (
        m.snapshot.map_or(0, |s| s.index),
        m.purged.map_or(0, |p| p.index),
    )
}

/// The leader keeps the entries a lagging member needs (up to `keep_for_lagging` before the
/// snapshot), so that one that is sent a snapshot finds the entries after it: openraft's own
/// policy purged them while a big snapshot was on its way (see `waft::purge`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_keeps_the_entries_a_lagging_member_needs() {
    let settings = RaftSettings {
        snapshot_every: 300,
        keep_after_snapshot: 0,
        keep_for_lagging: 1_500,
        ..test_settings()
    };
    let mut cluster = TestCluster::start(3, settings).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let leader = cluster.wait_leader().await;
    let lagger = (leader + 1) % 3;
    cluster.stop(lagger).await;
    let held_back = cluster
        .node(leader)
        .metrics()
        .replication
        .and_then(|r| r.get(&(lagger as u64)).cloned().flatten())
        .map_or(0, |l| l.index);
    let mut last = 0;
    for i in 0..1200 {
        last = cluster.write(kv(format!("put k{} v{i}", i % 100))).await.0;
    }
    // Give the purge task (every 0.5 s) its chance.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (snapshot, purged) = leader_snapshot_and_purged(&cluster).await;
    assert!(
        snapshot > held_back + 600,
        "snapshots were built ({snapshot})"
    );
    assert!(
        purged <= held_back,
        "purged up to {purged}, past what the stopped member acknowledged ({held_back})"
    );
    // Past the bound, the stopped member holds back no more.
    for i in 0..2000 {
        last = cluster.write(kv(format!("put k{} v{i}", i % 100))).await.0;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (snapshot, purged) = leader_snapshot_and_purged(&cluster).await;
    assert!(purged > held_back, "purged up to {purged}");
    assert!(
        purged + 1_500 >= snapshot,
        "{purged} vs snapshot {snapshot}"
    );
    // It comes back from a snapshot and the log after it.
    cluster.restart(lagger).await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_purged_entries_catches_up_by_snapshot() {
    let settings = RaftSettings {
        snapshot_every: 500,
        keep_after_snapshot: 0,
        // A member that is down holds back no entries.
        keep_for_lagging: 0,
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
    let snapshot_index = before.expect("a snapshot").index;
    assert!(
        snapshot_index < last,
        "entries after the snapshot ({snapshot_index}) are left to replay (last {last})"
    );
    cluster.stop(restarted).await;
    cluster.restart(restarted).await;
    cluster.wait_applied(last).await;
    // It hears from the leader again: a new write reaches it.
    let (after, _) = cluster.write(kv("put after restart")).await;
    cluster.wait_applied(after).await;
    // It started from its snapshot file, then replayed the log after it.
    let installed = cluster.node(restarted).state().snapshot_stats();
    assert!(
        installed.installed >= 1 && installed.last_installed_bytes > 0,
        "the restarted node installed its snapshot at start: {installed:?}"
    );
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

mod snapshot_transfer {
    //! The snapshot receiver refuses bad transfers cleanly and leaves no partial file behind.

    use crate::support::init_tracing;
    use std::time::Duration;
    use tokio_stream::wrappers::ReceiverStream;
    use waft::node::{Node, NodeConfig};
    use waft::pb::raft::{
        SnapshotChunk, SnapshotHeader, raft_client::RaftClient, snapshot_chunk::Kind,
    };
    use waft::raft::SnapshotLimits;
    use waft::types::{SnapshotMeta, Vote};

    fn header(size: u64) -> SnapshotChunk {
        let meta = SnapshotMeta::default();
        let payload = waft::pb::encode(&(Vote::new(1, 0), &meta)).expect("encode");
        SnapshotChunk {
            kind: Some(Kind::Header(SnapshotHeader {
                format: payload.format,
                vote_and_meta: payload.payload,
                size,
            })),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_stalled_and_corrupt_snapshots_are_refused() {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = NodeConfig::new(7, dir.path());
        config.snapshots = SnapshotLimits {
            max_bytes: 1 << 20,
            chunk_timeout: Duration::from_millis(300),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let node = Node::start(config, listener).await.expect("node");
        let mut client = RaftClient::connect(format!("http://{}", node.addr()))
            .await
            .expect("connect");

        tracing::info!("a snapshot larger than the cap is refused before any data is written");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(header(2 << 20)).await.expect("send");
        drop(tx);
        let e = client
            .install_snapshot(ReceiverStream::new(rx))
            .await
            .expect_err("over the cap");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");

        tracing::info!("a sender that stalls is cut off after the chunk timeout");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(header(1000)).await.expect("send");
        tx.send(SnapshotChunk {
            kind: Some(Kind::Data(vec![0; 100])),
        })
        .await
        .expect("send");
        let e = client
            .install_snapshot(ReceiverStream::new(rx))
            .await
            .expect_err("stalled");
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
        drop(tx);

        tracing::info!("bytes that fail the checksum are refused as data loss");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(header(1000)).await.expect("send");
        tx.send(SnapshotChunk {
            kind: Some(Kind::Data(vec![7; 1000])),
        })
        .await
        .expect("send");
        drop(tx);
        let e = client
            .install_snapshot(ReceiverStream::new(rx))
            .await
            .expect_err("corrupt");
        assert_eq!(e.code(), tonic::Code::DataLoss, "{e}");

        tracing::info!("a stream shorter than announced, or without a header, is refused");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(header(1000)).await.expect("send");
        tx.send(SnapshotChunk {
            kind: Some(Kind::Data(vec![7; 10])),
        })
        .await
        .expect("send");
        drop(tx);
        let e = client
            .install_snapshot(ReceiverStream::new(rx))
            .await
            .expect_err("short");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(SnapshotChunk {
            kind: Some(Kind::Data(vec![7; 10])),
        })
        .await
        .expect("send");
        drop(tx);
        let e = client
            .install_snapshot(ReceiverStream::new(rx))
            .await
            .expect_err("headless");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

        tracing::info!("garbage Raft messages are reported, not dropped");
        let e = client
            .vote(waft::pb::raft::RaftMessage {
                format: 1,
                payload: vec![0xff; 3],
            })
            .await
            .expect_err("garbage vote");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("undecodable"), "{e}");
        let e = client
            .vote(waft::pb::raft::RaftMessage {
                format: 99,
                payload: vec![],
            })
            .await
            .expect_err("unknown format");
        assert!(e.message().contains("incompatible waft versions"), "{e}");

        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
            .expect("snapshot dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("incoming-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "partial snapshot files left behind: {leftovers:?}"
        );
        node.shutdown().await.expect("shutdown");
    }
}

/// A TCP proxy to `target` that counts the connections it is given.
async fn counting_proxy(target: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_to_a_peer_take_the_connections_of_its_pool_in_turn() {
    use waft::pb::api::{StatusRequest, cluster_client::ClusterClient};
    use waft::raft::{Identity, NetConfig, NetworkFactory};
    let cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    for (connections, expected) in [(3, 3), (1, 1)] {
        let (proxy, count) = counting_proxy(cluster.addrs[0].clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = std::sync::Arc::new(Identity::load(9, dir.path()).expect("identity"));
        let factory = NetworkFactory::new(
            NetConfig {
                connections,
                ..NetConfig::default()
            },
            identity,
        );
        for _ in 0..6 {
            let channel = factory.channel(&proxy).expect("channel");
            ClusterClient::new(channel)
                .status(StatusRequest::default())
                .await
                .expect("status through the pool");
        }
        assert_eq!(
            count.load(std::sync::atomic::Ordering::Relaxed),
            expected,
            "six calls over a pool of {connections}"
        );
    }
    cluster.shutdown().await;
}

/// A follower whose log says less was committed than it holds (a crash between appending an
/// entry and recording that it was committed) rejoins when it restarts and catches up, from
/// the leader's heartbeats alone while nothing new is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_restarted_with_a_stale_committed_index_rejoins() {
    use openraft::RaftLogReader;
    use openraft::storage::RaftLogStorage;
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let mut last = 0;
    for i in 0..20 {
        last = cluster.write(kv(format!("put k{i} v{i}"))).await.0;
    }
    cluster.wait_applied(last).await;
    let follower = (cluster.wait_leader().await + 1) % 3;
    let stale = cluster
        .node(follower)
        .metrics()
        .last_log_index
        .expect("a log")
        - 1;
    cluster.stop(follower).await;
    {
        // Its log records an older committed index than the entries it holds.
        let path = cluster.dirs[follower].path().join("log.wal");
        let mut log = waft::storage::WalLog::open(&path).expect("open the log");
        let entries = log
            .get_log_reader()
            .await
            .try_get_log_entries(stale..=stale)
            .await
            .expect("read");
        let id = entries[0].log_id;
        log.save_committed(Some(id)).await.expect("save");
        // A synced write after it, so the hint reaches the file.
        let vote = log.read_vote().await.expect("vote").expect("a vote");
        log.save_vote(&vote).await.expect("sync");
    }
    // Down long enough for the leader's heartbeats to it to fail to connect several times.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.restart(follower).await;
    // With nothing written since, only the leader's heartbeats tell it what is committed
    // (they failed while it was down: the leader must go on sending them once it is back).
    cluster.wait_applied(last).await;
    let (index, _) = cluster.write(kv("put after restart")).await;
    cluster.wait_applied(index).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

/// Stopping a node closes the connections its server accepted, even one holding a stream that
/// never ends on its own: their tasks outlive the server's, and a peer would otherwise go on
/// talking to the stopped node instead of reconnecting to whatever listens there next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_closes_the_connections_it_accepted() {
    let mut cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    let mut client = waft::pb::api::waft_client::WaftClient::new(
        crate::support::channel(&cluster.addrs[0]).await,
    );
    // A session the client keeps open: graceful shutdown waits for it in vain.
    let pipe = waft::pb::session::Pipe::open(|r| async move { client.session(r).await })
        .await
        .expect("a session");
    cluster.stop(0).await;
    let mut closed = false;
    for _ in 0..100 {
        if pipe.is_broken() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "the stopped node's connection was closed");
}
