//! The determinism campaign: guests in Rust, Python and JavaScript that read every source of
//! nondeterminism their language offers (clocks, randomness, hash seeds, hash-map order), on
//! three `waft node` processes, through every lifecycle event a replica's instance goes
//! through: continuous writes, a follower stopped across a snapshot and log purge (it catches up
//! by snapshot), a node that lost its data joining again as a learner (by snapshot), trap
//! recovery, a hot-swap, a rollback, and a restart of every node. At the end
//! every replica's audit matches with nothing healed, and the replies each node's `Watch`
//! reports for the same entries are equal.

use crate::support::procs::{ProcCluster, connect, connect_with_deadline};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use waft::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use waft_testkit::guests::{TEST_DET_JS, TEST_DET_PYTHON, TEST_NONDET};

const SERVICES: [&str; 3] = ["rust", "python", "js"];

/// Submits `payload` to `service` through any node, retrying with the same sequence (applied
/// once) until it is acknowledged; returns the outcome.
pub(crate) async fn submit(
    addrs: &[String],
    service: &str,
    payload: &[u8],
    client_id: u64,
    seq: u64,
) -> Option<api::submit_reply::Outcome> {
    for attempt in 0..300 {
        let Some(ch) = connect(&addrs[attempt % addrs.len()]).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let r = WaftClient::new(ch)
            .submit(api::SubmitRequest {
                service: service.into(),
                payload: payload.to_vec(),
                client_id,
                sequence: seq,
            })
            .await;
        match r {
            Ok(r) => return r.into_inner().outcome,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    None
}

/// Writes to the three services in turn until `stop`, idle while `pause`; returns how many
/// were acknowledged.
async fn writer(addrs: Vec<String>, stop: Arc<AtomicBool>, pause: Arc<AtomicBool>) -> u64 {
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        if pause.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        seq += 1;
        let service = SERVICES[seq as usize % SERVICES.len()];
        let outcome = submit(&addrs, service, format!("c{seq}").as_bytes(), 0xd37, seq).await;
        assert!(
            matches!(outcome, Some(api::submit_reply::Outcome::Ok(_))),
            "write {seq} to {service}: {outcome:?}"
        );
        // Paced: the point is the lifecycle events, not load (other tests share the cores).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seq
}

/// Waits until node `i` has applied `index`.
pub(crate) async fn wait_applied(c: &ProcCluster, i: usize, index: u64) {
    // Generous: a node that starts loads three big components, and CI runs other tests beside
    // (a node rejoining without its data compiles them all: over 3 minutes seen on a slow
    // machine). The bound is only against a hang.
    let deadline = Instant::now() + Duration::from_secs(480);
    loop {
        if c.status(i).await.is_some_and(|s| s.applied_index >= index) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} never applied {index}; its log ends:\n{}",
            i + 1,
            c.log_tail(i, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn last_index(c: &ProcCluster) -> (usize, u64) {
    let l = c
        .wait_leader(Duration::from_secs(30))
        .await
        .expect("a leader");
    let s = c.status(l).await.expect("leader status");
    (l, s.last_log_index)
}

/// Makes an admin call on the leader, again (on whichever node leads then) while it answers
/// UNAVAILABLE, at most 5 times; panics with every node's log tail on any other error.
async fn on_leader<F, Fut>(c: &ProcCluster, what: &str, mut call: F)
where
    F: FnMut(WaftClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    // Deploys and rollbacks wait for the voters' compiles: minutes on a loaded machine.
    let admin = |addr: String| async move {
        let ch = connect_with_deadline(&addr, Duration::from_secs(300)).await;
        WaftClient::new(ch.expect("leader")).max_encoding_message_size(usize::MAX)
    };
    let mut tries = 0;
    loop {
        let (l, _) = last_index(c).await;
        let Err(e) = call(admin(c.addrs[l].clone()).await).await else {
            return;
        };
        tries += 1;
        if e.code() != tonic::Code::Unavailable || tries > 5 {
            let logs: Vec<String> = (0..3)
                .map(|i| format!("node {}:\n{}", i + 1, c.log_tail(i, 40)))
                .collect();
            panic!("{what}: {e}\n{}", logs.join("\n"));
        }
        tracing::warn!(error = %e, "{what} answered UNAVAILABLE; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs an audit through the leader (again when it meets a leader change) and checks that
/// every node's digest matched at it, nothing healed; the audit's reply.
pub(crate) async fn audit_equal(c: &ProcCluster) -> api::AuditReply {
    let mut attempts = Vec::new();
    let audit = loop {
        let (l, _) = last_index(c).await;
        // An audit digests every replica's whole state: seconds for a big one.
        let ch = connect_with_deadline(&c.addrs[l], Duration::from_secs(60))
            .await
            .expect("leader");
        match ClusterClient::new(ch).audit(api::AuditRequest {}).await {
            Ok(r) => break r.into_inner(),
            Err(e) if attempts.len() < 10 => {
                attempts.push(e.message().to_owned());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("the audit kept failing: {e}; before: {attempts:?}"),
        }
    };
    for i in 0..c.len() {
        wait_applied(c, i, audit.report_index).await;
        let a = c.status(i).await.expect("status").audit.unwrap_or_default();
        assert!(a.divergences.is_empty(), "node {}: {a:?}", i + 1);
        assert!(a.heals.is_empty(), "node {}: {a:?}", i + 1);
        // At it or at a later audit (a node's periodic auditor may run one meanwhile), every
        // one of which matched.
        assert!(
            a.last_checked_index >= Some(audit.index),
            "node {}: last checked {:?}, audit at {}",
            i + 1,
            a.last_checked_index,
            audit.index
        );
    }
    audit
}

/// Every event node `i` still keeps, from its history's first index to `until`.
/// Where node `i`'s watch history starts (it starts again when the node restarts or installs a
/// snapshot).
async fn history_start(c: &ProcCluster, i: usize) -> u64 {
    let ch = connect(&c.addrs[i]).await.expect("connect");
    let mut w = WaftClient::new(ch);
    match w
        .watch(api::WatchRequest {
            service: String::new(),
            start_index: 1,
            ..Default::default()
        })
        .await
    {
        Ok(_) => 1,
        Err(s) => {
            // "... its history starts at index N ..."
            let m = s.message();
            let after = m
                .split("starts at index ")
                .nth(1)
                .unwrap_or_else(|| panic!("node {}: {m}", i + 1));
            after
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .expect("an index")
        }
    }
}

async fn events(c: &ProcCluster, i: usize, until: u64) -> BTreeMap<u64, String> {
    let start = history_start(c, i).await;
    let ch = connect(&c.addrs[i]).await.expect("connect");
    let mut w = WaftClient::new(ch);
    let mut stream = w
        .watch(api::WatchRequest {
            service: String::new(),
            start_index: start,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = BTreeMap::new();
    // The writer has stopped: once no event comes for a few seconds, the history is read.
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
        let Some(e) = next.expect("the stream goes on") else {
            break;
        };
        if e.index > until {
            break;
        }
        out.insert(e.index, format!("{} {:?}", e.service, e.outcome));
        if e.index == until {
            break;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn determinism_campaign_every_source_every_lifecycle_event() {
    crate::support::init_tracing();
    let started = Instant::now();
    let built = |g: Result<&'static str, &'static str>| {
        g.unwrap_or_else(|why| panic!("a guest this campaign needs was not built: {why}"))
    };
    let mut c = ProcCluster::start(
        3,
        &[
            "--snapshot-every",
            "60",
            "--keep-after-snapshot",
            "10",
            // A stopped follower must need a snapshot to come back (a lifecycle event here).
            "--keep-for-lagging",
            "0",
            "--audit-interval",
            "0",
        ],
    )
    .await;
    c.deploy("rust", TEST_NONDET).await;
    c.deploy("python", built(TEST_DET_PYTHON)).await;
    c.deploy("js", built(TEST_DET_JS)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let writes = tokio::spawn(writer(c.addrs.clone(), stop.clone(), pause.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    eprintln!(
        "[{:>5.1}s] determinism campaign step",
        started.elapsed().as_secs_f64()
    );
    tracing::info!("a follower stopped across a snapshot and log purge");
    let (l, _) = last_index(&c).await;
    let f = (l + 1) % 3;
    c.kill(f);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (l, _) = last_index(&c).await;
    let mut cl = c.cluster_client(l).await.expect("leader");
    cl.trigger_snapshot(api::TriggerSnapshotRequest {})
        .await
        .expect("snapshot");
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.spawn(f, None);
    let (_, last) = last_index(&c).await;
    wait_applied(&c, f, last).await;
    assert!(
        super::count_in_logs(&c, "snapshot received from the leader") > 0,
        "the stopped follower caught up by snapshot"
    );

    eprintln!(
        "[{:>5.1}s] determinism campaign step",
        started.elapsed().as_secs_f64()
    );
    tracing::info!("a node that lost its data joins again as a learner, by snapshot");
    // Without writes meanwhile: with a snapshot every 60 entries and no entries kept for
    // lagging members, a node that compiles three guests at each install on a loaded machine
    // can be sent one snapshot after another for as long as writes go on (a full-suite run saw
    // it still behind after 8 minutes). The other steps keep writing.
    pause.store(true, Ordering::Relaxed);
    let (l, _) = last_index(&c).await;
    let lost = (l + 2) % 3;
    c.kill(lost);
    std::fs::remove_dir_all(c.data_dir(lost)).expect("wipe the data directory");
    let seed = c.addrs[l].clone();
    c.spawn_with(lost, None, &["--join", &seed]);
    // It becomes a voter once it caught up as a learner: by a snapshot whose three guests it
    // compiles first (minutes on a loaded machine, as `wait_applied` says; 90 s was not
    // enough beside the rest of the suite). The bound is only against a hang.
    let deadline = Instant::now() + Duration::from_secs(480);
    loop {
        let member = match c.status(l).await {
            Some(s) => s.members.into_iter().find(|m| m.id == lost as u64 + 1),
            None => None,
        };
        if member.is_some_and(|m| m.voter) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {} never became a voter again",
            lost + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, last) = last_index(&c).await;
    wait_applied(&c, lost, last).await;
    pause.store(false, Ordering::Relaxed);

    eprintln!(
        "[{:>5.1}s] determinism campaign step",
        started.elapsed().as_secs_f64()
    );
    tracing::info!("trap recovery: a command the Python guest cannot decode traps everywhere");
    let trapped = submit(&c.addrs, "python", &[0xff, 0xfe], 0xbad, 1).await;
    assert!(
        matches!(
            trapped,
            Some(api::submit_reply::Outcome::Trapped(_) | api::submit_reply::Outcome::Rejected(_))
        ),
        "{trapped:?}"
    );

    eprintln!(
        "[{:>5.1}s] determinism campaign step",
        started.elapsed().as_secs_f64()
    );
    tracing::info!("hot-swap (new limits make a new version) and rollback");
    let module = waft_testkit::wasm(TEST_NONDET);
    let header = api::DeployHeader {
        service: "rust".into(),
        size: module.len() as u64,
        fuel_per_apply: 2_000_000_000,
        ..Default::default()
    };
    // UNAVAILABLE means "retry" (the API's contract; `waft deploy` does): a retry of a deploy
    // that did go through changes nothing. Seen here since deploys wait for the voters'
    // compiles: an UNAVAILABLE "leadership moved (leader now None)" with no election in any
    // node's log (not yet explained; noted in issue 18).
    on_leader(&c, "hot-swap", |mut w| {
        let chunks = waft::pb::deploy_chunks_with(header.clone(), &module);
        async move { w.deploy(tokio_stream::iter(chunks)).await.map(drop) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The rollback names version 1 (not "the one before"), so a retry of one that did go
    // through makes the same module serve again.
    on_leader(&c, "rollback", |mut w| async move {
        w.rollback(api::RollbackRequest {
            service: "rust".into(),
            to_version: 1,
        })
        .await
        .map(drop)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    eprintln!(
        "[{:>5.1}s] determinism campaign step",
        started.elapsed().as_secs_f64()
    );
    tracing::info!("restart every node, one at a time");
    for i in 0..3 {
        c.kill(i);
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.spawn(i, None);
        let (_, last) = last_index(&c).await;
        wait_applied(&c, i, last).await;
    }
    stop.store(true, Ordering::Relaxed);
    let acknowledged = writes.await.expect("writer");
    assert!(
        acknowledged > 30,
        "the writer made progress ({acknowledged})"
    );
    // Every node catches up with no writes coming (so no more snapshots), then 30 more
    // commands, each acknowledged before the next: every node's watch history holds them. (A
    // node's history starts again at each snapshot it installs; this campaign keeps no entries
    // for lagging members, and under a busy machine a restarted follower that loads three
    // guests at each install can be sent one snapshot after another while writes go on.)
    let (_, last) = last_index(&c).await;
    for i in 0..3 {
        wait_applied(&c, i, last).await;
    }
    for n in 0..30u64 {
        let service = SERVICES[n as usize % SERVICES.len()];
        let payload = format!("after-restarts-{n}");
        let outcome = submit(&c.addrs, service, payload.as_bytes(), 0xd38, n + 1).await;
        assert!(
            matches!(outcome, Some(api::submit_reply::Outcome::Ok(_))),
            "write {n} after the restarts: {outcome:?}"
        );
    }

    eprintln!(
        "[{:>5.1}s] determinism campaign step",
        started.elapsed().as_secs_f64()
    );
    tracing::info!("every audit matches, nothing was healed");
    let audit = audit_equal(&c).await;
    assert_eq!(audit.services.len(), 3);

    eprintln!(
        "[{:>5.1}s] determinism campaign step",
        started.elapsed().as_secs_f64()
    );
    tracing::info!("the replies each node reports through Watch are equal");
    let mut per_node = Vec::new();
    for i in 0..3 {
        per_node.push(events(&c, i, audit.index).await);
    }
    let common: Vec<u64> = per_node[0]
        .keys()
        .filter(|k| per_node[1..].iter().all(|m| m.contains_key(k)))
        .copied()
        .collect();
    assert!(
        common.len() >= 10,
        "the nodes' watch histories overlap on {} entries",
        common.len()
    );
    for k in &common {
        assert_eq!(
            per_node[0][k], per_node[1][k],
            "entry {k}: node 1 vs node 2"
        );
        assert_eq!(
            per_node[0][k], per_node[2][k],
            "entry {k}: node 1 vs node 3"
        );
    }
    eprintln!(
        "determinism campaign: {acknowledged} writes, audit at {} matched on 3 nodes, {} entries' \
         replies compared through Watch",
        audit.index,
        common.len()
    );
}
