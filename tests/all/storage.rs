//! The redb log store and the state machine store: openraft's conformance suite, reopening,
//! and a crash during heavy writes.

use crate::support::init_tracing;
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use tempfile::TempDir;
use waft::runtime::{Runtime, RuntimeConfig};
use waft::storage::{RedbLog, StateMachineStore, WalLog};
use waft::types::TypeConfig;

struct Builder;

impl StoreBuilder<TypeConfig, RedbLog, StateMachineStore, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, RedbLog, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = RedbLog::open(&dir.path().join("log.redb")).expect("open log");
        let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
        let sm =
            StateMachineStore::new(runtime, &dir.path().join("snapshots")).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite_passes() {
    init_tracing();
    Suite::test_all(Builder)
        .await
        .expect("openraft's storage suite");
}

/// A WAL log; `follower`: of a node no entry's leader is, so every append that may be is
/// written in place on the calling task instead of by the writer thread.
struct WalBuilder {
    follower: bool,
}

impl StoreBuilder<TypeConfig, WalLog, StateMachineStore, TempDir> for WalBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, WalLog, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = WalLog::open(&dir.path().join("log.wal")).expect("open log");
        if self.follower {
            log = log.of_node(u64::MAX);
        }
        let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
        let sm =
            StateMachineStore::new(runtime, &dir.path().join("snapshots")).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_log_passes_openraft_storage_conformance_suite() {
    init_tracing();
    Suite::test_all(WalBuilder { follower: false })
        .await
        .expect("openraft's storage suite");
    Suite::test_all(WalBuilder { follower: true })
        .await
        .expect("openraft's storage suite, entries written in place");
}

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, LogId, RaftLogReader};
use waft::types::{Entry, Request, Vote};

fn log_id(index: u64) -> waft::types::LogId {
    LogId::new(
        openraft::impls::leader_id_adv::LeaderId {
            term: 1,
            node_id: 0,
        },
        index,
    )
}

fn entry(index: u64, payload_len: usize) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Request::Command {
            service: "kv".to_owned(),
            payload: vec![b'x'; payload_len],
            client: None,
            timestamp_ms: index,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_log_keeps_its_vote_entries_committed_and_purge_point() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    let vote = Vote::new(3, 1);
    {
        let mut log = RedbLog::open(&path).expect("open");
        log.save_vote(&vote).await.expect("vote");
        log.blocking_append((1..=100).map(|i| entry(i, 16)))
            .await
            .expect("append");
        log.save_committed(Some(log_id(90)))
            .await
            .expect("committed");
        log.purge(log_id(10)).await.expect("purge");
        log.truncate_after(Some(log_id(95)))
            .await
            .expect("truncate");
    }
    tracing::info!("reopen: everything written before the close is there");
    let mut log = RedbLog::open(&path).expect("reopen");
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    assert_eq!(
        log.read_committed().await.expect("committed"),
        Some(log_id(90))
    );
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(log_id(10)));
    assert_eq!(state.last_log_id, Some(log_id(95)));
    let entries = log.try_get_log_entries(0..200).await.expect("entries");
    assert_eq!(entries.first().map(|e| e.log_id.index), Some(11));
    assert_eq!(entries.len(), 85);
    assert_eq!(entries[5], entry(16, 16));
}

#[test]
fn a_corrupt_or_foreign_log_file_is_a_clear_startup_error() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0xAB; 64 << 10]).expect("write");
    let e = RedbLog::open(&garbage).expect_err("garbage must not open as an empty log");
    assert!(
        e.to_string().contains("cannot open the log database"),
        "{e}"
    );

    tracing::info!("a file cut short after a clean close is refused too, never read as empty");
    let cut = dir.path().join("cut.redb");
    {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let mut log = RedbLog::open(&cut).expect("open");
            log.blocking_append((1..=2000).map(|i| entry(i, 256)))
                .await
                .expect("append");
        });
    }
    let len = std::fs::metadata(&cut).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .expect("open file");
    file.set_len(len / 3).expect("truncate");
    drop(file);
    match RedbLog::open(&cut) {
        Err(e) => assert!(
            e.to_string().contains("cannot open the log database"),
            "{e}"
        ),
        Ok(_) => panic!("a truncated log opened as if it were fine"),
    }
}

/// The child side of the crash tests: appends without waiting and prints each flushed index.
/// Not a test of its own (ignored, so it never counts as a pass): the crash tests run it in a
/// child process with `--ignored`, WAFT_CRASH_DIR and WAFT_CRASH_ENGINE set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the crash tests, which run it themselves"]
async fn crash_child_log_writer() {
    let dir = std::env::var("WAFT_CRASH_DIR").expect("run by a crash test, with WAFT_CRASH_DIR");
    let dir = std::path::Path::new(&dir);
    if std::env::var("WAFT_CRASH_ENGINE").as_deref() == Ok("wal") {
        write_forever(WalLog::open(&dir.join("log.wal")).expect("open")).await;
    } else {
        write_forever(RedbLog::open(&dir.join("log.redb")).expect("open")).await;
    }
}

async fn write_forever<L: RaftLogStorage<TypeConfig>>(mut log: L) {
    use std::io::Write;
    let (report, mut flushed) =
        tokio::sync::mpsc::unbounded_channel::<(u64, tokio::sync::oneshot::Receiver<_>)>();
    tokio::spawn(async move {
        // Callbacks fire in order; report each batch's last index once it is durable.
        while let Some((last, rx)) = flushed.recv().await {
            let result: Result<(), std::io::Error> = rx.await.expect("callback");
            result.expect("flush");
            println!("flushed {last}");
            std::io::stdout().flush().expect("stdout");
        }
    });
    let mut next = 1;
    loop {
        let batch: Vec<Entry> = (next..next + 50).map(|i| entry(i, 512)).collect();
        next += 50;
        let (tx, rx) = TypeConfig::oneshot();
        log.append(batch, openraft::storage::IOFlushed::signal(tx))
            .await
            .expect("append");
        report.send((next - 1, rx)).expect("report");
        tokio::task::yield_now().await;
    }
}

#[test]
fn a_process_killed_during_heavy_writes_loses_no_flushed_entry() {
    let (dir, max_flushed) = crash_a_writer("redb");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(check_flushed(
        RedbLog::open(&dir.path().join("log.redb")).expect("reopen after the crash"),
        max_flushed,
    ));
}

#[test]
fn a_wal_writer_killed_during_heavy_writes_loses_no_flushed_entry() {
    let (dir, max_flushed) = crash_a_writer("wal");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(check_flushed(
        WalLog::open(&dir.path().join("log.wal")).expect("reopen after the crash"),
        max_flushed,
    ));
}

/// Runs the child writer with `engine`, SIGKILLs it past 20,000 flushed entries; returns its
/// directory and the highest index it reported flushed.
fn crash_a_writer(engine: &str) -> (TempDir, u64) {
    use std::io::BufRead;
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "storage::crash_child_log_writer",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("WAFT_CRASH_DIR", dir.path())
        .env("WAFT_CRASH_ENGINE", engine)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut max_flushed = 0;
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("flushed ") {
            max_flushed = n.parse().expect("index");
            if max_flushed >= 20_000 {
                break;
            }
        }
    }
    tracing::info!(
        engine,
        max_flushed,
        "SIGKILL the writer in the middle of its writes"
    );
    child.kill().expect("kill");
    // Lines already written before the kill count too.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("flushed ") {
            max_flushed = max_flushed.max(n.parse().expect("index"));
        }
    }
    let _ = child.wait();
    assert!(max_flushed >= 20_000, "the child reported flushes");
    (dir, max_flushed)
}

async fn check_flushed<L: RaftLogStorage<TypeConfig> + RaftLogReader<TypeConfig>>(
    mut log: L,
    max_flushed: u64,
) {
    let state = log.get_log_state().await.expect("state");
    let last = state.last_log_id.map(|l| l.index).unwrap_or(0);
    assert!(
        last >= max_flushed,
        "reported flushed up to {max_flushed}, but the log ends at {last}"
    );
    let entries = log
        .try_get_log_entries(1..=max_flushed)
        .await
        .expect("read");
    assert_eq!(
        entries.len() as u64,
        max_flushed,
        "every flushed entry is there"
    );
    for (e, i) in entries.iter().zip(1..) {
        assert_eq!(e, &entry(i, 512));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_the_redb_engine_replicates_restarts_and_agrees() {
    use crate::support::cluster::{TestCluster, kv, test_settings};
    use waft::node::{LogEngine, Node, NodeConfig};
    // Every other cluster test runs on the default engine (the WAL); this one on redb.
    let mut cluster = TestCluster::start_with(3, test_settings(), |c| {
        c.log_engine = Some(LogEngine::Redb);
    })
    .await;
    cluster.form().await;
    cluster
        .deploy("kv", waft_testkit::wasm(waft_testkit::guests::EXAMPLE_KV))
        .await;
    for i in 0..200 {
        cluster.write(kv(format!("put a{i} {i}"))).await;
    }
    let follower = (cluster.wait_leader().await + 1) % 3;
    cluster.stop(follower).await;
    for i in 0..200 {
        cluster.write(kv(format!("put b{i} {i}"))).await;
    }
    cluster.restart(follower).await;
    let (last, _) = cluster.write(kv("put end 1")).await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    let dir = cluster.dirs[follower].path().to_owned();
    assert!(dir.join("log.redb").exists() && !dir.join("log.wal").exists());

    // A directory keeps its engine: starting it with the other one is refused, in words...
    cluster.stop(follower).await;
    let mut config = NodeConfig::new(follower as u64, &dir);
    config.log_engine = Some(LogEngine::Wal);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let e = Node::start(config, listener)
        .await
        .expect_err("the other engine is refused");
    assert!(e.to_string().contains("other engine"), "{e}");
    assert!(!dir.join("log.wal").exists(), "nothing created");
    // ...and without a wish, it opens with the engine it holds (the defaults say WAL).
    cluster.configure = |_| {};
    cluster.restart(follower).await;
    let (last, _) = cluster.write(kv("put after 1")).await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    assert!(!dir.join("log.wal").exists(), "still on redb");
    cluster.shutdown().await;
}

/// A follower whose log cannot grow (a full disk: a file size limit on its process) fails the
/// write of the leader's entries, which it does in place, and stops in words; the cluster
/// loses nothing: the two others acknowledge every write, and the follower, started again
/// with room, catches up to the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_whose_log_cannot_grow_stops_and_the_cluster_loses_nothing() {
    use crate::support::procs::ProcCluster;
    use std::time::Duration;
    use waft_client::{Client, Consistency, Outcome};
    let (mut c, l, f) =
        ProcCluster::kv_with_a_follower_stopped(waft_testkit::guests::EXAMPLE_KV).await;
    // Room for 16 KB more of records (the zeros written ahead of them do not count).
    let records = c.wal_records(f);
    c.spawn(f, Some(records + 16_000));
    let client = Client::connect(c.addrs[l].clone()).await.expect("client");
    for i in 0..400 {
        let applied = client
            .submit("kv", format!("put key{i:03} value-{i}"))
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
        assert!(matches!(applied.outcome, Outcome::Ok(_)), "{applied:?}");
    }
    let Some(status) = c.wait_exited(f, Duration::from_secs(30)).await else {
        panic!(
            "the follower kept running with a log it cannot write:\n{}",
            c.log_tail(f, 20)
        )
    };
    assert!(!status.success(), "{status}");
    assert!(
        c.log(f).contains("log write failed"),
        "{}",
        c.log_tail(f, 20)
    );
    let get = |key: &'static str| {
        let client = client.clone();
        async move {
            match client
                .query("kv", key.as_bytes().to_vec(), Consistency::Linearizable)
                .await
                .expect("query")
                .outcome
            {
                Outcome::Ok(v) => String::from_utf8_lossy(&v).into_owned(),
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(get("get key399").await, "value-399");
    // Started again with room: it cuts the torn record, catches up, and answers alike.
    c.spawn(f, None);
    let leader_applied = c.status(l).await.expect("leader status").applied_index;
    let mut caught_up = false;
    for _ in 0..300 {
        if c.status(f)
            .await
            .is_some_and(|s| s.applied_index >= leader_applied)
        {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(caught_up, "{}", c.log_tail(f, 20));
    // The follower's own state (a stale read is answered by the node asked).
    let ch = crate::support::procs::connect(&c.addrs[f])
        .await
        .expect("connect");
    let mut on_f = waft::pb::api::waft_client::WaftClient::new(ch);
    for key in ["get key000", "get key200", "get key399"] {
        let reply = on_f
            .query(waft::pb::api::QueryRequest {
                service: "kv".into(),
                payload: key.as_bytes().to_vec(),
                consistency: waft::pb::api::Consistency::Stale as i32,
            })
            .await
            .expect("query")
            .into_inner();
        let Some(waft::pb::api::query_reply::Outcome::Ok(v)) = reply.outcome else {
            panic!("{reply:?}");
        };
        assert_eq!(String::from_utf8_lossy(&v), get(key).await, "{key}");
    }
}
