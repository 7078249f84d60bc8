//! Compiled code shared between members (`waft node --share-compiled`, issue 18): a member
//! asked to hold a new module loads the code the leader compiled instead of compiling it;
//! only under mutual TLS, only code for its own engine, never a partial file.

use crate::support::cluster::{TestCluster, kv, test_settings};
use crate::tls::{client_tls, connect, node_tls, pki};
use futures::StreamExt;
use futures::future::BoxFuture;
use std::time::Duration;
use waft::pb::api::{self, waft_client::WaftClient};
use waft::raft::PeerModules;
use waft::runtime::ModuleHash;
use waft::storage::ModulePeers;
use waft::storage::modules::ModuleBytes;
use waft::types::NodeId;
use waft_testkit::guests::{EXAMPLE_KV, TEST_KV2};

/// Deploys `module` as `service` through `addr` over TLS.
async fn deploy_tls(addr: &str, service: &str, module: Vec<u8>) -> api::DeployReply {
    let p = pki();
    let ch = connect(addr, Some(client_tls(&p.ca, None)))
        .await
        .expect("TLS connection");
    let chunks = vec![
        api::DeployChunk {
            kind: Some(api::deploy_chunk::Kind::Header(api::DeployHeader {
                service: service.to_owned(),
                size: module.len() as u64,
                ..Default::default()
            })),
        },
        api::DeployChunk {
            kind: Some(api::deploy_chunk::Kind::Data(module)),
        },
    ];
    WaftClient::new(ch)
        .max_encoding_message_size(usize::MAX)
        .deploy(futures::stream::iter(chunks))
        .await
        .expect("deploy")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_that_share_compiled_code_load_the_leaders_instead_of_compiling() {
    // Without mutual TLS a node refuses the option: it would run code any caller sent.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = waft::node::NodeConfig::new(1, dir.path());
    config.net.share_compiled = true;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    match waft::node::Node::start(config, listener).await {
        Ok(_) => panic!("a node shared compiled code without mutual TLS"),
        Err(e) => assert!(e.to_string().contains("mutual TLS"), "{e}"),
    }

    let cluster = TestCluster::start_with(3, test_settings(), |c| {
        c.net.tls = Some(node_tls());
        c.net.share_compiled = true;
    })
    .await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let before: Vec<_> = (0..3)
        .map(|i| cluster.node(i).state().compile_stats())
        .collect();
    let module = waft_testkit::wasm(TEST_KV2);
    let hash = ModuleHash::of(&module);
    let reply = deploy_tls(&cluster.addrs[leader], "kv", module).await;
    assert_eq!(reply.module_sha256, hash.to_hex());
    cluster.wait_applied(reply.index).await;
    let artifact = |i: usize| {
        std::fs::read(
            cluster
                .node(i)
                .state()
                .compiled_code(&hash.to_hex(), &runtime_key(&cluster, i))
                .expect("compiled code on disk"),
        )
        .expect("read")
    };
    for (i, (was, was_fetched)) in before.into_iter().enumerate() {
        let (stats, fetched) = cluster.node(i).state().compile_stats();
        if i == leader {
            assert_eq!(stats.compiled, was.compiled + 1, "the leader compiles");
            assert_eq!(fetched, was_fetched);
        } else {
            assert_eq!(stats.compiled, was.compiled, "node {i} compiled: {stats:?}");
            assert_eq!(fetched, was_fetched + 1, "node {i} fetched nothing");
            // (At least once: a module nothing uses yet leaves memory between the hold and
            // the apply, and comes back from the disk.)
            assert!(stats.loaded > was.loaded, "node {i} did not load it");
            assert_eq!(artifact(i), artifact(leader), "node {i} holds other code");
        }
    }
    // And the code serves on every node.
    let (index, _) = cluster.write(kv("put shared yes")).await;
    cluster.wait_applied(index).await;
    for i in 0..3 {
        let got = cluster
            .node(i)
            .state()
            .query("kv", b"get shared".to_vec())
            .await
            .expect("query");
        assert_eq!(got, b"yes", "node {i}");
    }

    // A member asks for code for an engine that is not the server's, or for a module the
    // server never compiled: NOT_FOUND, in words.
    let me = (leader + 1) % 3;
    let peers = PeerModules::new(me as NodeId, cluster.node(me).network().clone());
    let leader_addr = cluster.addrs[leader].clone();
    let open = |sha: String, key: String| {
        peers.open_compiled(leader as NodeId, leader_addr.clone(), sha, key)
    };
    let other_engine = open(hash.to_hex(), "0123456789abcdef".into())
        .await
        .err()
        .expect("another engine's code");
    assert!(
        other_engine.contains("compiles for engine key"),
        "{other_engine}"
    );
    let never = open("ab".repeat(32), runtime_key(&cluster, me))
        .await
        .err()
        .expect("a module never compiled");
    assert!(never.contains("no compiled code"), "{never}");
    cluster.shutdown().await;
}

fn runtime_key(cluster: &TestCluster, i: usize) -> String {
    cluster.node(i).state().artifact_key().to_owned()
}

/// A node that does not share compiled code refuses to serve it; a member that does not
/// share never asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_that_do_not_share_compiled_code_neither_serve_nor_ask() {
    let cluster = TestCluster::start(2, test_settings()).await;
    cluster.form().await;
    let module = waft_testkit::wasm(EXAMPLE_KV);
    let hash = ModuleHash::of(&module);
    cluster.deploy("kv", module).await;
    let net = cluster.node(1).network();
    let mut peer = waft::pb::raft::raft_client::RaftClient::new(
        net.channel(&cluster.addrs[0]).expect("channel"),
    );
    let mut req = tonic::Request::new(waft::pb::raft::FetchModuleRequest {
        sha256: hash.to_hex(),
        offset: 0,
        compiled_for: cluster.node(0).state().artifact_key().to_owned(),
    });
    net.identity().stamp(req.metadata_mut(), 0);
    let refused = peer.fetch_module(req).await.expect_err("not shared");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("--share-compiled"), "{refused}");
    let asked = PeerModules::new(1, net.clone())
        .open_compiled(0, cluster.addrs[0].clone(), hash.to_hex(), "k".into())
        .await
        .err()
        .expect("a node that does not share never asks");
    assert!(asked.contains("does not share"), "{asked}");
    cluster.shutdown().await;
}

/// Announces `announced` bytes and sends `sent`.
struct Short {
    announced: u64,
    sent: usize,
}

impl ModulePeers for Short {
    fn me(&self) -> NodeId {
        9
    }

    fn open(
        &self,
        _: NodeId,
        _: String,
        _: String,
        _: u64,
    ) -> BoxFuture<'static, Result<ModuleBytes, String>> {
        Box::pin(async { Err("modules are not asked for here".to_owned()) })
    }

    fn open_compiled(
        &self,
        _: NodeId,
        _: String,
        _: String,
        _: String,
    ) -> BoxFuture<'static, Result<(u64, ModuleBytes), String>> {
        let (announced, sent) = (self.announced, self.sent);
        Box::pin(async move {
            let bytes = vec![7u8; sent];
            Ok((
                announced,
                futures::stream::iter([Ok(bytes)]).boxed() as ModuleBytes,
            ))
        })
    }
}

/// Compiled code shorter or longer than announced is never kept (the member compiles
/// instead); code of the announced size is kept under the runtime's name for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_code_of_the_wrong_size_is_never_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("x-key.cwasm");
    let hash = ModuleHash::of(b"x");
    let sources = vec![(1, "127.0.0.1:1".to_owned())];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (announced, sent, expect) in [(100, 50, "50 of the 100"), (10, 50, "more than the 10")] {
        let peers = Short { announced, sent };
        let e = waft::storage::compiled::fetch(&peers, &sources, &hash, "key", &dest, deadline)
            .await
            .expect_err("wrong size");
        assert!(e.contains(expect), "{e}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    let peers = Short {
        announced: 50,
        sent: 50,
    };
    let from = waft::storage::compiled::fetch(&peers, &sources, &hash, "key", &dest, deadline)
        .await
        .expect("the announced size");
    assert_eq!(from, 1);
    assert_eq!(std::fs::read(&dest).expect("kept"), vec![7u8; 50]);
}
