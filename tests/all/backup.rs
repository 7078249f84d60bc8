//! Backup and restore: a consistent backup taken through any node restores into a fresh
//! cluster with the same services, versions and states; bad backups are refused whole.

use crate::support::cluster::{TestCluster, kv, test_settings};
use waft::pb::api::{self, cluster_client::ClusterClient};
use waft::types::Request;
use waft_testkit::guests::{EXAMPLE_COUNTER, EXAMPLE_KV, TEST_KV2};

use crate::support::waft_cli as waft;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_restores_into_a_fresh_cluster_with_the_same_state() {
    let a = TestCluster::start(3, test_settings()).await;
    a.form().await;
    a.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    a.deploy("counter", waft_testkit::wasm(EXAMPLE_COUNTER))
        .await;
    for i in 0..200 {
        a.write(kv(format!("put k{i:03} value-{i}"))).await;
    }
    a.deploy("kv", waft_testkit::wasm(TEST_KV2)).await;
    let (last, _) = a
        .write(Request::Command {
            service: "counter".into(),
            payload: br#"{"add":{"name":"c","by":41}}"#.to_vec(),
            client: None,
            timestamp_ms: 1,
        })
        .await;
    a.wait_applied(last).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("waft.backup");
    let follower = a.addrs[(a.wait_leader().await + 1) % 3].clone();
    let o = waft(&[
        "--endpoint",
        &follower,
        "backup",
        "-o",
        file.to_str().expect("utf-8"),
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("2 service(s)"), "{said}");
    let expected = a.assert_identical().await;
    let a_services: Vec<(String, u32)> = a
        .node(0)
        .state()
        .services()
        .into_iter()
        .map(|s| (s.name, s.version))
        .collect();
    a.shutdown().await;

    tracing::info!("restore into a fresh cluster through a follower");
    let b = TestCluster::start(3, test_settings()).await;
    b.form().await;
    let follower = b.addrs[(b.wait_leader().await + 1) % 3].clone();
    let o = waft(&[
        "--endpoint",
        &follower,
        "restore",
        file.to_str().expect("utf-8"),
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("restored 2 service(s)"));
    let (last, _) = b.write(kv("put after restore")).await;
    b.wait_applied(last).await;
    let got = b.assert_identical().await;
    assert_eq!(got["counter"], expected["counter"]);
    let q = b
        .node(2)
        .state()
        .query("kv", b"get k123".to_vec())
        .await
        .expect("get");
    assert_eq!(q, b"value-123");
    let b_services: Vec<(String, u32)> = b
        .node(1)
        .state()
        .services()
        .into_iter()
        .map(|s| (s.name, s.version))
        .collect();
    assert_eq!(b_services, a_services, "same services at the same versions");

    tracing::info!("a second restore is refused without --force, accepted with it");
    let o = waft(&[
        "--endpoint",
        &b.addrs[0],
        "restore",
        file.to_str().expect("utf-8"),
    ])
    .await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already runs"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = waft(&[
        "--endpoint",
        &b.addrs[0],
        "restore",
        "--force",
        file.to_str().expect("utf-8"),
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q = b.node(0).state().query("kv", b"get after".to_vec()).await;
    assert!(q.is_err(), "the forced restore replaced kv's state: {q:?}");

    tracing::info!("damaged backups are refused whole, locally and by the server");
    let bytes = std::fs::read(&file).expect("read");
    let truncated = dir.path().join("short.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let o = waft(&[
        "--endpoint",
        &b.addrs[0],
        "restore",
        "--force",
        truncated.to_str().expect("utf-8"),
    ])
    .await;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a usable backup"));
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 3] ^= 0x40;
    let mut c = ClusterClient::connect(format!("http://{}", b.addrs[1]))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX);
    let e = c
        .restore(futures::stream::iter(waft::api::restore_chunks(
            &flipped, true,
        )))
        .await
        .expect_err("corrupt");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("checksum"), "{e}");
    let e = c
        .restore(futures::stream::iter(vec![api::BackupChunk {
            kind: Some(api::backup_chunk::Kind::Data(vec![1, 2, 3])),
        }]))
        .await
        .expect_err("headerless");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let after = b.assert_identical().await;
    assert_eq!(
        after["counter"], expected["counter"],
        "the refused restores changed nothing"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_seeds_an_empty_data_dir_offline() {
    use std::time::Duration;
    use waft::node::{Node, NodeConfig};
    let a = TestCluster::start(1, test_settings()).await;
    a.form().await;
    a.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let mut last = 0;
    for i in 0..50 {
        last = a.write(kv(format!("put k{i:02} v{i}"))).await.0;
    }
    a.wait_applied(last).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("waft.backup");
    let file_s = file.to_str().expect("utf-8");
    // The file as etcdctl takes it (positional), and as the flag of earlier releases.
    let o = waft(&["--endpoint", &a.addrs[0], "backup", file_s]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = waft(&["--endpoint", &a.addrs[0], "backup", "-o", file_s]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!dir.path().join("waft.backup.partial").exists());
    let o = waft(&["--endpoint", &a.addrs[0], "backup"]).await;
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("<FILE>"),
        "a backup needs a file: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let expected = a.assert_identical().await;
    a.shutdown().await;

    let seeded = tempfile::tempdir().expect("tempdir");
    let seeded_s = seeded.path().to_str().expect("utf-8");
    let addr = crate::support::free_addr();
    let o = waft(&[
        "restore",
        file_s,
        "--data-dir",
        seeded_s,
        "--id",
        "7",
        "--advertise",
        &addr,
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("seeded") && said.contains("[kv]"), "{said}");

    tracing::info!("a directory that holds a node is refused, and so is a damaged backup");
    let o = waft(&["restore", file_s, "--data-dir", seeded_s, "--id", "7"]).await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already holds a node's data"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let bytes = std::fs::read(&file).expect("read");
    // A truncated backup, and one from a later waft (a format this build does not know,
    // checksum intact): each refused in words, nothing written.
    let mut newer = bytes.clone();
    let next = waft::storage::snapshot::FORMAT + 1;
    newer[7] = b'0' + next;
    let body = newer.len() - 32;
    let sum = <sha2::Sha256 as sha2::Digest>::digest(&newer[..body]);
    newer[body..].copy_from_slice(&sum);
    let newer_said = format!("written by a newer waft (snapshot format {next})");
    let empty = tempfile::tempdir().expect("tempdir");
    for (name, content, said) in [
        (
            "short.backup",
            &bytes[..bytes.len() - 100],
            "not a usable backup",
        ),
        ("newer.backup", &newer[..], newer_said.as_str()),
    ] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, content).expect("write");
        let o = waft(&[
            "restore",
            bad.to_str().expect("utf-8"),
            "--data-dir",
            empty.path().to_str().expect("utf-8"),
            "--id",
            "1",
        ])
        .await;
        assert!(!o.status.success(), "{name}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(said),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !empty.path().join("log.redb").exists() && !empty.path().join("log.wal").exists(),
            "{name}: nothing written"
        );
    }

    tracing::info!("the seeded node starts as a one-node cluster with the state; a joiner gets it");
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    let mut config = NodeConfig::new(7, seeded.path());
    config.raft = test_settings();
    let seed = Node::start(config, listener)
        .await
        .expect("seeded node starts");
    seed.raft()
        .wait(Some(Duration::from_secs(30)))
        .state(openraft::ServerState::Leader, "the seeded node leads")
        .await
        .expect("leads");
    let q = seed.state().query("kv", b"get k42".to_vec()).await;
    assert_eq!(q.expect("get"), b"v42");
    assert_eq!(
        seed.state().service_states().await.expect("states"),
        expected,
        "the seeded node holds the backup's state, byte for byte"
    );
    let other_dir = tempfile::tempdir().expect("tempdir");
    let mut config = NodeConfig::new(8, other_dir.path());
    config.raft = test_settings();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let other = Node::start(config, listener).await.expect("starts");
    seed.raft()
        .add_learner(
            8,
            openraft::BasicNode {
                addr: other.addr().to_owned(),
            },
            true,
        )
        .await
        .expect("add learner");
    let written = seed
        .raft()
        .client_write(kv("put after seeding"))
        .await
        .expect("write");
    other
        .raft()
        .wait(Some(Duration::from_secs(30)))
        .applied_index_at_least(Some(written.log_id.index), "joiner caught up")
        .await
        .expect("caught up");
    let got = other.state().service_states().await.expect("states");
    assert_eq!(got, seed.state().service_states().await.expect("states"));
    assert_ne!(
        got["kv"], expected["kv"],
        "the write after seeding is there"
    );
    other.shutdown().await.expect("stop");
    seed.shutdown().await.expect("stop");
}
