//! Modules outside the log (issue 18): every node keeps modules by sha256 in its module store;
//! a deploy entry names its module by hash; the leader proposes it once a majority of the
//! voters holds the module; a node that lacks one fetches it from a peer, resuming a broken
//! transfer; data directories written when deploys carried their modules keep opening.

use crate::hotswap::{client, deploy};
use crate::support::cluster::{TestCluster, kv, test_settings};
use futures::StreamExt;
use futures::future::BoxFuture;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use waft::pb::api;
use waft::raft::modules::{HoldError, hold_module};
use waft::runtime::ModuleHash;
use waft::storage::modules::ModuleBytes;
use waft::storage::{ModulePeers, ModuleStore};
use waft::types::NodeId;
use waft_testkit::guests::{EXAMPLE_KV, TEST_KV2};

fn log_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("data dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("log"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

/// Rolls service `kv` back to version `to` through the node at `addr`.
async fn rollback_kv(addr: &str, to: u32) -> api::DeployReply {
    client(addr)
        .await
        .rollback(api::RollbackRequest {
            service: "kv".into(),
            to_version: to,
        })
        .await
        .expect("rollback")
        .into_inner()
}

fn hash_of(path: &str) -> ModuleHash {
    ModuleHash::of(&waft_testkit::wasm(path))
}

/// A deploy puts the module into every node's store, and its log entry carries only the hash:
/// the logs grow by far less than the module.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_entry_names_its_module_and_every_node_holds_it() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let before: Vec<u64> = cluster.dirs.iter().map(|d| log_bytes(d.path())).collect();
    let module = waft_testkit::wasm(TEST_KV2);
    let reply = deploy(&cluster.addrs[0], "kv", TEST_KV2, false)
        .await
        .expect("deploy");
    cluster.wait_applied(reply.index).await;
    let hash = ModuleHash::of(&module);
    for (i, dir) in cluster.dirs.iter().enumerate() {
        assert!(
            cluster.node(i).state().modules().contains(&hash),
            "node {i} holds the module"
        );
        let grown = log_bytes(dir.path()) - before[i];
        assert!(
            grown < module.len() as u64 / 4,
            "node {i}: the log grew by {grown} bytes for a {}-byte module",
            module.len()
        );
    }
    let (index, _) = cluster.write(kv("put a 1")).await;
    cluster.wait_applied(index).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

/// `HoldModule` and `FetchModule` refuse in words what a node cannot do, and change no state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holding_a_module_refuses_what_a_node_cannot_run() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let net = cluster.node(0).network();
    let (to, addr) = (1, cluster.addrs[1].clone());
    let from = vec![(0, cluster.addrs[0].clone())];
    let module = waft_testkit::wasm(EXAMPLE_KV);
    let sha = ModuleHash::of(&module).to_hex();
    let size = module.len() as u64;
    let short = Duration::from_secs(2);
    let failed = |r: Result<u64, HoldError>| match r {
        Err(HoldError::Failed(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    };

    // A message for another node (the address is node 1's) is refused before it is read.
    let stranger = failed(hold_module(net, 2, &addr, &sha, size, &from, None, short).await);
    assert!(stranger.contains("not node 2"), "{stranger}");
    // Nobody holds it yet: node 0 answers NOT_FOUND, and node 1 gives up at its deadline.
    let missing = failed(hold_module(net, to, &addr, &sha, size, &from, None, short).await);
    assert!(missing.contains("does not hold module"), "{missing}");
    // Over the node's size limit: refused before any transfer.
    let huge = failed(hold_module(net, to, &addr, &sha, 1 << 40, &from, None, short).await);
    assert!(huge.contains("limit"), "{huge}");
    // Not a guest: fetched, then refused by the compiler.
    let garbage = b"\0asm\x0d\0\x01\0 not a component".to_vec();
    let garbage_hash = cluster
        .node(0)
        .state()
        .modules()
        .insert(&garbage)
        .expect("store");
    let refused = failed(
        hold_module(
            net,
            to,
            &addr,
            &garbage_hash.to_hex(),
            garbage.len() as u64,
            &from,
            None,
            short,
        )
        .await,
    );
    assert!(refused.contains("cannot run the module"), "{refused}");
    // FetchModule: a malformed hash, and one the node does not hold.
    let mut peer = waft::pb::raft::raft_client::RaftClient::new(net.channel(&addr).expect("ch"));
    let fetch = |sha256: String| {
        let mut req = tonic::Request::new(waft::pb::raft::FetchModuleRequest {
            sha256,
            offset: 0,
            ..Default::default()
        });
        net.identity().stamp(req.metadata_mut(), to);
        req
    };
    let bad = peer
        .fetch_module(fetch("xyz".into()))
        .await
        .expect_err("bad");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    let absent = peer
        .fetch_module(fetch("ab".repeat(32)))
        .await
        .expect_err("absent");
    assert_eq!(absent.code(), tonic::Code::NotFound, "{absent}");

    // A good module, once node 0 holds it: node 1 fetches, keeps and compiles it.
    cluster
        .node(0)
        .state()
        .modules()
        .insert(&module)
        .expect("store");
    hold_module(
        net,
        to,
        &addr,
        &sha,
        size,
        &from,
        None,
        Duration::from_secs(60),
    )
    .await
    .expect("a good module");
    assert!(
        cluster
            .node(1)
            .state()
            .modules()
            .contains(&ModuleHash::of(&module))
    );
    assert!(
        cluster.node(1).state().services().is_empty(),
        "holding changes no state"
    );

    // The push of an earlier release's leader (`PrepareModule`) still works: a push cut short
    // is refused and keeps nothing; a whole one is kept in the store and compiled.
    use waft::pb::raft::{ModuleChunk, ModuleHeader, module_chunk::Kind};
    let v2 = waft_testkit::wasm(TEST_KV2);
    let push = |chunks: Vec<ModuleChunk>| {
        let mut req = tonic::Request::new(futures::stream::iter(chunks));
        net.identity().stamp(req.metadata_mut(), to);
        req
    };
    let header = ModuleChunk {
        kind: Some(Kind::Header(ModuleHeader {
            sha256: hash_of(TEST_KV2).to_hex(),
            size: v2.len() as u64,
        })),
    };
    let half = ModuleChunk {
        kind: Some(Kind::Data(v2[..v2.len() / 2].to_vec())),
    };
    let cut = peer
        .prepare_module(push(vec![header.clone(), half]))
        .await
        .expect_err("a push cut short");
    assert_eq!(cut.code(), tonic::Code::InvalidArgument, "{cut}");
    assert!(
        !cluster
            .node(1)
            .state()
            .modules()
            .contains(&hash_of(TEST_KV2))
    );
    let whole = ModuleChunk {
        kind: Some(Kind::Data(v2.clone())),
    };
    peer.prepare_module(push(vec![header, whole]))
        .await
        .expect("a whole push");
    assert!(
        cluster
            .node(1)
            .state()
            .modules()
            .contains(&hash_of(TEST_KV2))
    );
    cluster.shutdown().await;
}

/// The leader proposes a deploy only once a majority of the voters holds the module; when the
/// others cannot take it, the deploy is refused in words and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_no_majority_can_hold_is_refused() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    deploy(&cluster.addrs[0], "kv", EXAMPLE_KV, false)
        .await
        .expect("v1");
    let leader = cluster.wait_leader().await;
    // The two followers now take no module larger than 1 KiB.
    cluster.configure = |c| c.runtime.limits.max_module_bytes = 1024;
    for i in (0..3).filter(|i| *i != leader) {
        cluster.stop(i).await;
        cluster.restart(i).await;
    }
    let (index, _) = cluster.write(kv("put a 1")).await;
    cluster.wait_applied(index).await;
    // The node that takes the module must lead (a capped one refuses the upload itself).
    for _ in 0..100 {
        let now = cluster.wait_leader().await;
        if now == leader {
            break;
        }
        let _ = cluster
            .node(now)
            .raft()
            .trigger()
            .transfer_leader(leader as NodeId)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cluster.wait_leader().await, leader, "leadership went back");
    let e = deploy(&cluster.addrs[leader], "kv", TEST_KV2, false)
        .await
        .expect_err("no majority holds it");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(
        e.message().contains("of the 3 voters hold the module"),
        "{e}"
    );
    for i in 0..3 {
        let services = cluster.node(i).state().services();
        assert_eq!(services[0].version, 1, "node {i} still runs v1");
    }
    cluster.shutdown().await;
}

/// Records each transfer a node opens and spoils the first one: `corrupt` flips a byte of its
/// first chunk, otherwise it breaks after one chunk.
struct Breaking {
    inner: waft::raft::PeerModules,
    offsets: Arc<Mutex<Vec<u64>>>,
    corrupt: bool,
}

impl ModulePeers for Breaking {
    fn me(&self) -> NodeId {
        self.inner.me()
    }

    fn open(
        &self,
        node: NodeId,
        addr: String,
        sha256: String,
        offset: u64,
    ) -> BoxFuture<'static, Result<ModuleBytes, String>> {
        let first = {
            let mut offsets = self.offsets.lock().expect("lock");
            offsets.push(offset);
            offsets.len() == 1
        };
        let open = self.inner.open(node, addr, sha256, offset);
        let corrupt = self.corrupt;
        Box::pin(async move {
            let stream = open.await?;
            if first && corrupt {
                let flipped = stream.enumerate().map(|(i, chunk)| {
                    chunk.map(|mut bytes| {
                        if i == 0 {
                            bytes[10] ^= 0xff;
                        }
                        bytes
                    })
                });
                return Ok(flipped.boxed());
            }
            if first {
                let cut = stream.take(1).chain(futures::stream::once(async {
                    Err("connection reset (injected)".to_owned())
                }));
                return Ok(cut.boxed());
            }
            Ok(stream)
        })
    }
}

/// A transfer cut short resumes from the bytes received, not from the start; a corrupt one is
/// thrown away and fetched again; a module nobody holds is an error at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_module_transfer_resumes_where_it_stopped() {
    let cluster = TestCluster::start(2, test_settings()).await;
    cluster.form().await;
    // Three chunks and a bit (the store does not care whether it is a component).
    let bytes: Vec<u8> = (0..(3 * waft::storage::modules::CHUNK_BYTES + 1000))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let hash = cluster
        .node(0)
        .state()
        .modules()
        .insert(&bytes)
        .expect("store");
    let offsets = Arc::new(Mutex::new(Vec::new()));
    let peers = Breaking {
        inner: waft::raft::PeerModules::new(1, cluster.node(1).network().clone()),
        offsets: offsets.clone(),
        corrupt: false,
    };
    let store = cluster.node(1).state().modules().clone();
    let sources = vec![(0, cluster.addrs[0].clone())];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    store
        .fetch(&peers, &sources, &hash, Some(deadline))
        .await
        .expect("fetched");
    assert_eq!(
        *offsets.lock().expect("lock"),
        vec![0, waft::storage::modules::CHUNK_BYTES as u64],
        "the second attempt starts after the chunk the first one received"
    );
    assert_eq!(store.read(&hash).expect("kept"), bytes);

    // A corrupt chunk: the whole transfer fails its hash check, is thrown away, and the next
    // attempt starts over; nothing damaged is ever kept.
    let other: Vec<u8> = bytes.iter().map(|b| b.wrapping_add(1)).collect();
    let other_hash = cluster
        .node(0)
        .state()
        .modules()
        .insert(&other)
        .expect("store");
    let offsets = Arc::new(Mutex::new(Vec::new()));
    let peers = Breaking {
        inner: waft::raft::PeerModules::new(1, cluster.node(1).network().clone()),
        offsets: offsets.clone(),
        corrupt: true,
    };
    store
        .fetch(&peers, &sources, &other_hash, Some(deadline))
        .await
        .expect("fetched on the second attempt");
    assert_eq!(*offsets.lock().expect("lock"), vec![0, 0]);
    assert_eq!(store.read(&other_hash).expect("kept"), other);

    // A source that does not hold it: the fetch gives up at its deadline, naming the cause.
    let missing = ModuleHash::of(b"no node has this");
    let e = store
        .fetch(
            &peers,
            &sources,
            &missing,
            Some(tokio::time::Instant::now() + Duration::from_secs(1)),
        )
        .await
        .expect_err("nobody holds it");
    assert!(
        matches!(&e, waft::storage::modules::FetchError::Remote(m) if m.contains("does not hold module")),
        "{e}"
    );
    assert!(!store.contains(&missing));
    cluster.shutdown().await;
}

/// A node that lost a module file (or never had it: it was down during the deploys) fetches
/// it from a peer before it applies an entry that runs it: a restart replays the deploys, a
/// rollback runs an old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_missing_a_module_fetches_it_before_applying() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let lagging = (leader + 1) % 3;
    cluster.stop(lagging).await;
    let up = cluster.addrs[(lagging + 1) % 3].clone();
    deploy(&up, "kv", EXAMPLE_KV, false).await.expect("v1");
    cluster.write(kv("put a 1")).await;
    deploy(&up, "kv", TEST_KV2, false).await.expect("v2");
    let (index, _) = cluster.write(kv("put b 2")).await;
    cluster.restart(lagging).await;
    cluster.wait_applied(index).await;
    let store = cluster.node(lagging).state().modules().clone();
    let (v1, v2) = (hash_of(EXAMPLE_KV), hash_of(TEST_KV2));
    assert!(store.contains(&v1) && store.contains(&v2));
    cluster.assert_identical().await;

    // Now it loses version 1's file while it runs, and the cluster rolls back to version 1.
    std::fs::remove_file(
        cluster.dirs[lagging]
            .path()
            .join(format!("modules/{v1}.wasm")),
    )
    .expect("remove");
    assert!(!store.contains(&v1));
    let back = rollback_kv(&up, 1).await;
    assert_eq!(back.module_sha256, v1.to_hex());
    let (index, _) = cluster.write(kv("put c 3")).await;
    cluster.wait_applied(index).await;
    assert!(store.contains(&v1), "fetched again");
    assert_eq!(cluster.node(lagging).state().services()[0].module.hash, v1);
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

/// The store keeps what is used, removes what is not once it is old enough, and never serves a
/// damaged file.
#[test]
fn the_module_store_removes_unused_modules_and_damaged_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModuleStore::open(dir.path()).expect("open");
    let a = store.insert(b"module a").expect("a");
    let b = store.insert(b"module b").expect("b");
    assert_eq!(store.insert(b"module a").expect("again"), a, "idempotent");
    assert_eq!(store.hashes(), {
        let mut v = vec![a, b];
        v.sort();
        v
    });
    let used = std::collections::BTreeSet::from([a]);
    assert_eq!(
        store.retain(&used, Duration::from_secs(3600)),
        0,
        "too recent"
    );
    assert_eq!(store.retain(&used, Duration::ZERO), 1);
    assert!(store.contains(&a) && !store.contains(&b));
    // A damaged file is an error and goes away (the next fetch replaces it).
    std::fs::write(dir.path().join(format!("{a}.wasm")), b"module A").expect("damage");
    let e = store.read(&a).expect_err("damaged");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    assert!(!store.contains(&a));
    // Reopening forgets interrupted writes.
    std::fs::write(dir.path().join("x.tmp"), b"half").expect("tmp");
    ModuleStore::open(dir.path()).expect("reopen");
    assert!(!dir.path().join("x.tmp").exists());
}

/// A data directory written by the release that kept modules inside deploy entries (and in
/// the snapshot) opens: the node replays those entries, its store fills from them and from
/// the snapshot, every version can serve again, and new deploys name modules by hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_directory_with_modules_in_the_log_opens() {
    crate::support::init_tracing();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data-wal-0.1");
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture, dir.path());
    let start = || async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut config = waft::node::NodeConfig::new(1, dir.path());
        config.raft = test_settings();
        waft::node::Node::start(config, listener)
            .await
            .expect("the old data directory opens")
    };
    let node = start().await;
    let addr = node.addr().to_owned();
    // The one voter elects itself.
    let mut tries = 0;
    while !node.metrics().state.is_leader() {
        tries += 1;
        assert!(tries < 600, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let services = node.state().services();
    let names: Vec<(&str, u32)> = services
        .iter()
        .map(|s| (s.name.as_str(), s.version))
        .collect();
    assert_eq!(names, vec![("counter", 1), ("kv", 2)]);
    // The modules the old release wrote (built then; a fresh build of the same sources in
    // another checkout or toolchain has other bytes, so these come from the fixture's notes).
    let fixture_module = |hex: &str| ModuleHash::from_hex(hex).expect("a sha256");
    let kv1 = fixture_module(FIXTURE_KV1);
    let kv2 = fixture_module(FIXTURE_KV2);
    let counter = fixture_module(FIXTURE_COUNTER);
    for h in [kv1, kv2, counter] {
        assert!(
            node.state().modules().contains(&h),
            "module {h} in the store"
        );
    }
    assert_eq!(get(&node, "k7").await, b"v7");
    assert_eq!(get(&node, "after").await, b"v2");
    let hits = node
        .state()
        .query("counter", br#"{"get": {"name": "hits"}}"#.to_vec())
        .await
        .expect("counter");
    assert!(String::from_utf8_lossy(&hits).contains("15"), "{hits:?}");

    // Version 1's module came from the snapshot: rolling back to it works.
    let back = rollback_kv(&addr, 1).await;
    assert_eq!(back.module_sha256, kv1.to_hex());
    // A new deploy names its module by hash, and the log does not carry it.
    let before = log_bytes(dir.path());
    let again = deploy(&addr, "kv", TEST_KV2, false).await.expect("deploy");
    assert_eq!(again.version, 4);
    assert!(log_bytes(dir.path()) - before < 10_000);
    assert_eq!(get(&node, "k7").await, b"v7");
    node.shutdown().await.expect("shutdown");

    // And the directory, now with both kinds of deploy entries, opens again.
    let node = start().await;
    let mut tries = 0;
    while node.state().services().iter().map(|s| s.version).max() != Some(4) {
        tries += 1;
        assert!(tries < 600, "not replayed: {:?}", node.state().services());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&node, "k30").await, b"v30");
    let r = node.state().services();
    assert_eq!(r[1].module.hash, hash_of(TEST_KV2));
    node.shutdown().await.expect("shutdown");
}

/// The modules in `tests/fixtures/data-wal-0.1` (see its `.md`): kv version 1, kv version 2,
/// counter.
const FIXTURE_KV1: &str = "445c933e3703a45636b124aff38f74de47d7072278db5fa0624c75acc40ecb5c";
const FIXTURE_KV2: &str = "f46c1b2e79f3b1e3308e17614e85caea988db2b7125910cb21d4418e3f151bf9";
const FIXTURE_COUNTER: &str = "c3db5ff867c716d052ecc6c2a0a9eb06f4542606b0c289bf9cdf2a4813403aee";

async fn get(node: &waft::node::Node, key: &str) -> Vec<u8> {
    node.state()
        .query("kv", format!("get {key}").into_bytes())
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A peer that accepts the connection and never answers holds a fetch up for one chunk
/// timeout; the node then fetches from the next member that holds the module.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_never_answers_a_fetch_is_passed_over() {
    let cluster = TestCluster::start_with(2, test_settings(), |c| {
        c.net.module_chunk_timeout = Duration::from_secs(1);
    })
    .await;
    cluster.form().await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();
    let bytes = waft_testkit::wasm(TEST_KV2);
    let hash = cluster
        .node(0)
        .state()
        .modules()
        .insert(&bytes)
        .expect("store");
    let peers = waft::raft::PeerModules::new(1, cluster.node(1).network().clone());
    let store = cluster.node(1).state().modules().clone();
    let only_silent = vec![(7, silent_addr.clone())];
    let e = store
        .fetch(
            &peers,
            &only_silent,
            &hash,
            Some(tokio::time::Instant::now() + Duration::from_secs(3)),
        )
        .await
        .expect_err("the silent peer gives nothing");
    assert!(e.to_string().contains(&silent_addr), "{e}");
    let both = vec![(7, silent_addr), (0, cluster.addrs[0].clone())];
    store
        .fetch(
            &peers,
            &both,
            &hash,
            Some(tokio::time::Instant::now() + Duration::from_secs(60)),
        )
        .await
        .expect("fetched from the member that answers");
    assert_eq!(store.read(&hash).expect("kept"), bytes);
    drop(silent);
    cluster.shutdown().await;
}

/// A node that cannot store a module (its disk is full) refuses to hold it, so the deploy goes
/// ahead on the majority that can; when the entry reaches it, it stops in words rather than
/// apply without the module, and the others keep serving the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_disk_is_full_stops_at_a_deploy_it_cannot_store() {
    use crate::support::procs::{ProcCluster, connect};
    let (mut c, _, f) = ProcCluster::kv_with_a_follower_stopped(EXAMPLE_KV).await;
    // No file of its may grow past 40 KB: its log has room, the 77 KB module has not.
    // (The log's records, not the zeros it writes ahead of them.)
    let wal = c.wal_records(f);
    assert!(wal < 24_000, "the log is small ({wal} bytes)");
    c.spawn(f, Some(40_000));
    c.deploy("kv", TEST_KV2).await;
    let Some(status) = c.wait_exited(f, Duration::from_secs(60)).await else {
        panic!(
            "the node kept running without the module:\n{}",
            c.log_tail(f, 20)
        )
    };
    assert!(!status.success(), "{status}");
    let log = c.log(f);
    assert!(log.contains("cannot store module"), "{}", c.log_tail(f, 20));
    assert!(
        !c.data_dir(f)
            .join("modules")
            .join(format!("{}.wasm", hash_of(TEST_KV2)))
            .exists(),
        "nothing half-written is kept"
    );
    let l = c
        .wait_leader(Duration::from_secs(20))
        .await
        .expect("a leader");
    let ch = connect(&c.addrs[l]).await.expect("connect");
    let services = waft::pb::api::waft_client::WaftClient::new(ch)
        .list_services(api::ListServicesRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(services.services[0].version, 2, "{services:?}");
}
