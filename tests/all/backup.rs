//! Backup and restore: a consistent backup taken through any node restores into a fresh
//! cluster with the same services, versions and states; bad backups are refused whole.

use crate::cluster_support::{TestCluster, kv, test_settings};
use waft::pb::api::{self, cluster_client::ClusterClient};
use waft::raft::types::Request;
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
