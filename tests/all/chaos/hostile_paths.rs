//! Every misbehaviour on every path a guest call takes, on three `waft node` processes (issue
//! 36, item 4), run by the hostile campaign (`chaos/hostile.rs`) on its cluster after its
//! rounds, while its clients still load the kv service. Guests in Rust, Python, JavaScript and
//! C print to stdout and stderr (flushed, and megabytes of it), raise, panic and abort, loop
//! until their fuel runs out, grow memory to the limit, sleep, read stdin, overflow the stack
//! and return replies too big to send; and every snapshot and restore they make prints too.
//! Each of those is driven through:
//!
//! - single applies and batches (inline or on the blocking pool, one `apply-batch` call), with
//!   trap recovery replaying the instance's history after each trap;
//! - rebases (every few entries, `--rebase-every`), snapshots and a restore (a node that missed
//!   purged entries installs a snapshot);
//! - timers that print, panic and loop when they fire (the `ticker` test guest);
//! - queries, stale on a follower and linearizable through the leader;
//! - a dry run (deploy validation against the current state, replay through the running module
//!   and the new one) with the verifier, and, off the cluster, `waft exec --verify` and
//!   `waft check`.
//!
//! Each call is answered in words (ok, rejected, trapped) as the guest's language says it
//! should, and no node stops; the campaign then checks that no host fault was contained, every
//! acknowledged write is there and every replica's audit is equal.

use super::determinism::{last_index, submit, wait_applied};
use crate::support::bin::waft_cli;
use crate::support::procs::{ProcCluster, connect};
use std::time::{Duration, Instant};
use waft::pb::api::{self, waft_client::WaftClient};
use waft_testkit::guests::{
    TEST_HOSTILE, TEST_HOSTILE_C, TEST_HOSTILE_JS, TEST_HOSTILE_PYTHON, TEST_TICKER,
};

/// Fuel per call for the hostile services: a loop is spent in a fraction of a second.
const FUEL: &str = "300000000";

/// A call's answer, from a submit or a query.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Ok(Vec<u8>),
    Rejected(String),
    Trapped(String),
}

impl From<api::submit_reply::Outcome> for Answer {
    fn from(o: api::submit_reply::Outcome) -> Answer {
        use api::submit_reply::Outcome as O;
        match o {
            O::Ok(r) => Answer::Ok(r),
            O::Rejected(m) => Answer::Rejected(m),
            O::Trapped(m) => Answer::Trapped(m),
        }
    }
}

impl From<api::query_reply::Outcome> for Answer {
    fn from(o: api::query_reply::Outcome) -> Answer {
        use api::query_reply::Outcome as O;
        match o {
            O::Ok(r) => Answer::Ok(r),
            O::Rejected(m) => Answer::Rejected(m),
            O::Trapped(m) => Answer::Trapped(m),
        }
    }
}

/// What a call must answer.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// `ok`, the reply starting with this.
    Ok(&'static str),
    /// `trapped`, naming this.
    Trapped(&'static str),
    /// `trapped` or `rejected`, naming this (the language runtime decides which: JavaScript
    /// catches some of its own out-of-memory errors).
    Refused(&'static str),
}

impl Expect {
    fn check(self, got: &Option<Answer>, what: &str) {
        let right = match (self, got) {
            (Expect::Ok(want), Some(Answer::Ok(r))) => r.starts_with(want.as_bytes()),
            (Expect::Trapped(want), Some(Answer::Trapped(m))) => m.contains(want),
            (Expect::Refused(want), Some(Answer::Trapped(m) | Answer::Rejected(m))) => {
                m.contains(want)
            }
            _ => false,
        };
        let shown = match got {
            Some(Answer::Ok(r)) => {
                format!("ok {:?}", String::from_utf8_lossy(&r[..r.len().min(80)]))
            }
            other => format!("{other:?}"),
        };
        assert!(right, "{what}: expected {self:?}, got {shown}");
    }
}

/// A hostile service: its name, module, memory limit, each misbehaviour (command, and the
/// same words as a query) with its answer, and the commands the determinism verifier replays
/// (a dry run on a node, `waft exec --verify`): not those that run out of fuel or memory,
/// which cost seconds in every history the verifier tries, and whose answer can depend on the
/// instance's history (JavaScript's heap: a caught `out of memory` error in a long-lived
/// instance, a trap in a fresh one), which the verifier rightly reports.
struct Hostile {
    service: &'static str,
    path: &'static str,
    memory_mib: &'static str,
    misbehaviour: Vec<(&'static str, Expect)>,
    verify: &'static [&'static str],
}

fn hostile_services() -> Vec<Hostile> {
    use Expect::*;
    let built = |p: Result<&'static str, &str>, what: &str| {
        p.unwrap_or_else(|e| panic!("the hostile {what} guest: {e}"))
    };
    vec![
        Hostile {
            service: "py",
            path: built(TEST_HOSTILE_PYTHON, "Python"),
            memory_mib: "128",
            misbehaviour: vec![
                ("print", Ok("printed")),
                ("print-flush", Ok("printed")),
                ("print-mb 2", Ok("printed")),
                (
                    "raise",
                    Trapped("ValueError: deliberate uncaught exception"),
                ),
                ("sleep 5", Ok("slept")),
                ("stdin", Ok("read 0 bytes")),
                ("loop", Trapped("fuel")),
                ("bomb", Trapped("memory limit")),
                ("recurse", Trapped("RecursionError")),
                ("huge 1000", Ok("xxxx")),
                ("huge 5000000", Refused("limit")),
            ],
            verify: &[
                "print",
                "print-flush",
                "raise",
                "sleep 5",
                "stdin",
                "recurse",
                "huge 1000",
            ],
        },
        Hostile {
            service: "js",
            path: built(TEST_HOSTILE_JS, "JavaScript"),
            memory_mib: "128",
            misbehaviour: vec![
                ("print", Ok("printed")),
                ("print-flush", Ok("printed")),
                ("print-mb 2", Ok("printed")),
                ("throw", Trapped("guest panicked")),
                ("loop", Trapped("fuel")),
                ("bomb", Refused("memory")),
                ("recurse", Refused("")),
                ("huge 1000", Ok("xxxx")),
                ("huge 5000000", Refused("limit")),
            ],
            verify: &["print", "print-flush", "throw", "huge 1000"],
        },
        Hostile {
            service: "c",
            path: built(TEST_HOSTILE_C, "C"),
            memory_mib: "64",
            misbehaviour: vec![
                ("print", Ok("printed")),
                ("print-flush", Ok("printed")),
                ("print-mb 2", Ok("printed")),
                ("abort", Trapped("deliberate abort")),
                ("loop", Trapped("fuel")),
                ("bomb", Trapped("")),
                ("recurse", Trapped("out of bounds")),
                ("huge 1000", Ok("xxxx")),
                ("huge 5000000", Refused("limit")),
            ],
            verify: &["print", "print-flush", "abort", "recurse", "huge 1000"],
        },
        Hostile {
            service: "evil",
            path: TEST_HOSTILE,
            memory_mib: "64",
            misbehaviour: vec![
                ("print-flush 2", Ok("OK")),
                ("print-mb 2", Ok("OK")),
                (
                    "panic-stderr",
                    Trapped("deliberate panic after a flushed stderr line"),
                ),
                ("stdin", Ok("read 0 bytes")),
                ("loop", Trapped("fuel")),
                ("bomb", Trapped("memory limit")),
                ("recurse", Trapped("out of bounds")),
                ("huge 1000", Ok("xxxx")),
                ("huge 5000000", Refused("limit")),
            ],
            verify: &[
                "print-flush 2",
                "panic-stderr",
                "stdin",
                "recurse",
                "huge 1000",
            ],
        },
    ]
}

/// Submits through any node (retrying with the same sequence): the answer, `None` if none came.
async fn apply(c: &ProcCluster, service: &str, cmd: &str, client: u64, seq: u64) -> Option<Answer> {
    submit(&c.addrs, service, cmd.as_bytes(), client, seq)
        .await
        .map(Answer::from)
}

/// A query to node `i` at `consistency`: its answer, `None` on a transport error.
async fn query(
    c: &ProcCluster,
    i: usize,
    service: &str,
    q: &str,
    consistency: api::Consistency,
) -> Option<Answer> {
    let ch = connect(&c.addrs[i]).await?;
    WaftClient::new(ch)
        .max_decoding_message_size(usize::MAX)
        .query(api::QueryRequest {
            service: service.into(),
            payload: q.as_bytes().to_vec(),
            consistency: consistency as i32,
        })
        .await
        .ok()?
        .into_inner()
        .outcome
        .map(Answer::from)
}

/// Deploys through the CLI (any node that answers), with the hostile services' limits.
async fn deploy(c: &ProcCluster, service: &str, path: &str, memory_mib: &str) {
    let mut last = String::new();
    for attempt in 0..30 {
        let addr = &c.addrs[attempt % c.len()];
        let out = waft_cli(&[
            "--endpoint",
            addr,
            "deploy",
            path,
            "--service",
            service,
            "--fuel",
            FUEL,
            "--max-memory-mib",
            memory_mib,
        ])
        .await;
        if out.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("deploy of {service} never succeeded: {last}");
}

fn assert_running(c: &ProcCluster, nodes: &[usize], after: &str) {
    for &i in nodes {
        assert!(
            c.running(i),
            "node {} stopped after {after}: {}",
            i + 1,
            c.log_tail(i, 30)
        );
    }
}

/// The keys of the timers the ticker guest's `fired` query lists.
fn fired(got: &Option<Answer>) -> Vec<String> {
    match got {
        Some(Answer::Ok(f)) => String::from_utf8_lossy(f)
            .lines()
            .filter_map(|l| l.split(' ').next())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// How many times `needle` appears in node `i`'s log.
fn in_log(c: &ProcCluster, i: usize, needle: &str) -> usize {
    c.log(i).matches(needle).count()
}

/// The node arguments the campaign's cluster runs with: rebases every few entries, snapshots
/// often enough that a node down for a while comes back by installing one.
pub(super) const NODE_ARGS: &[&str] = &[
    "--snapshot-every",
    "300",
    "--keep-after-snapshot",
    "5",
    "--keep-for-lagging",
    "0",
    "--rebase-every",
    "15",
    "--audit-interval",
    "0",
];

/// Deploys the hostile services (`py`, `js`, `c`, `evil`) with their limits, and `ticker`,
/// whose timers misbehave when they fire. (A guest that sets timers is never given batches,
/// so the hostile guests set none.)
pub(super) async fn deploy_all(c: &ProcCluster) {
    for h in hostile_services() {
        deploy(c, h.service, h.path, h.memory_mib).await;
    }
    deploy(c, "ticker", TEST_TICKER, "64").await;
}

/// Every misbehaviour of every hostile service on every path (see the module's comment), on
/// `c` with its hostile services deployed and load running; node 3 is stopped and restarted.
pub(super) async fn every_path(c: &mut ProcCluster) {
    let services = hostile_services();
    tracing::info!("node 3 stops: it will come back by installing a snapshot");
    c.kill(2);
    let log3_before = c.log(2).len();
    let up = [0, 1];

    tracing::info!("each misbehaviour alone, as single applies (trap recovery after each trap)");
    let mut seq = 1_000;
    for (n, h) in services.iter().enumerate() {
        let client = 0x5000 + n as u64;
        for (round, (cmd, expect)) in h.misbehaviour.iter().enumerate() {
            seq += 1;
            let set = format!("set s{round} {round}");
            let got = apply(c, h.service, &set, client, seq).await;
            Expect::Ok("OK").check(&got, &format!("{} {set}", h.service));
            seq += 1;
            let got = apply(c, h.service, cmd, client, seq).await;
            expect.check(&got, &format!("{} apply {cmd}", h.service));
        }
        assert_running(c, &up, &format!("{}'s single applies", h.service));
    }

    tracing::info!("all of them at once among sets, so they share batches");
    for (n, h) in services.iter().enumerate() {
        let calls: Vec<_> = h
            .misbehaviour
            .iter()
            .map(|(cmd, e)| (cmd.to_string(), Some(*e)))
            .chain((0..8).map(|i| (format!("set b{i} {i}"), Some(Expect::Ok("")))))
            .enumerate()
            .map(|(k, (cmd, e))| {
                let addrs = c.addrs.clone();
                let service = h.service;
                tokio::spawn(async move {
                    let client = 0x6000 + (n as u64) * 100 + k as u64;
                    let got = submit(&addrs, service, cmd.as_bytes(), client, 1).await;
                    (cmd, e, got.map(Answer::from))
                })
            })
            .collect();
        for call in calls {
            let (cmd, expect, got) = call.await.expect("a batched call");
            if let Some(e) = expect {
                e.check(&got, &format!("{} batched {cmd}", h.service));
            }
        }
        assert_running(c, &up, &format!("{}'s batches", h.service));
    }

    tracing::info!("timers that print, panic and loop when they fire");
    for (key, action) in [("t1", "print"), ("t2", "panic"), ("t3", "loop")] {
        seq += 1;
        let got = apply(
            c,
            "ticker",
            &format!("after {key} 200 {action}"),
            0x7000,
            seq,
        )
        .await;
        Expect::Ok("ok").check(&got, &format!("timer {key}"));
    }

    tracing::info!("queries: stale on each follower, linearizable through the leader");
    let (leader, _) = last_index(c).await;
    for h in &services {
        for (cmd, expect) in &h.misbehaviour {
            for (i, consistency) in [
                ((leader + 1) % 3, api::Consistency::Stale),
                (leader, api::Consistency::Linearizable),
            ] {
                if i == 2 {
                    continue; // node 3 is down
                }
                let got = query(c, i, h.service, cmd, consistency).await;
                expect.check(
                    &got,
                    &format!(
                        "{} query {cmd} ({consistency:?}) on node {}",
                        h.service,
                        i + 1
                    ),
                );
            }
        }
        assert_running(c, &up, &format!("{}'s queries", h.service));
    }

    tracing::info!("the first timer fired on every live node; the others trapped and are gone");
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in [0, 1] {
        loop {
            let got = query(c, i, "ticker", "fired", api::Consistency::Stale).await;
            if fired(&got).contains(&"t1".to_owned()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "t1 never fired on node {}: {got:?}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    for i in [0, 1] {
        loop {
            let log = c.log(i);
            let failed: Vec<bool> = ["t2", "t3"]
                .iter()
                .map(|key| {
                    log.lines().any(|l| {
                        l.contains("a timer's delivery failed")
                            && l.contains(&format!("timer={key}"))
                    })
                })
                .collect();
            if failed.iter().all(|f| *f) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: did timers t2 and t3 fail? {failed:?}\n{}",
                i + 1,
                c.log_tail(i, 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = query(c, i, "ticker", "fired", api::Consistency::Stale).await;
        assert_eq!(fired(&got), ["t1"], "node {}: {got:?}", i + 1);
    }

    tracing::info!(
        "node 3 comes back: the entries it missed are purged, so it installs a snapshot"
    );
    c.spawn(2, None);
    let (_, last) = last_index(c).await;
    for i in 0..3 {
        wait_applied(c, i, last).await;
    }
    let log3 = c.log(2)[log3_before..].to_owned();
    assert!(
        log3.contains("snapshot installed"),
        "node 3 caught up without a snapshot"
    );
    assert!(
        log3.matches("restored").count() >= services.len(),
        "node 3 restored fewer guests from the snapshot than there are: {}",
        log3.matches("restored").count()
    );
    let on_3 = query(c, 2, "ticker", "fired", api::Consistency::Stale).await;
    assert_eq!(fired(&on_3), ["t1"], "node 3's timers: {on_3:?}");

    tracing::info!("a dry run with the verifier replays each service's misbehaviour on a node");
    let dir = tempfile::tempdir().expect("temp dir");
    for h in &services {
        let replay = dir.path().join(format!("{}.txt", h.service));
        std::fs::write(&replay, h.verify.join("\n")).expect("write replay");
        let started = Instant::now();
        let out = waft_cli(&[
            "--endpoint",
            &c.addrs[leader],
            "deploy",
            h.path,
            "--service",
            h.service,
            "--dry-run",
            "--verify",
            "--replay",
            replay.to_str().expect("utf-8 path"),
            // The service's limits: without them the new module would run under the nodes'
            // defaults, and the dry run would rightly report that a loop answers differently.
            "--fuel",
            FUEL,
            "--max-memory-mib",
            h.memory_mib,
        ])
        .await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{} dry run: {:?}\n{text}",
            h.service,
            out.status
        );
        assert!(
            text.contains("no findings") && text.contains(": 0 replies differ"),
            "{} dry run: {text}",
            h.service
        );
        assert_running(c, &up, &format!("{}'s dry run", h.service));
        tracing::info!("{}'s dry run took {:?}", h.service, started.elapsed());
    }

    tracing::info!("off the cluster: waft exec --verify and waft check on each guest");
    // Node 1's compiled code: the same binary made it, so nothing is compiled again.
    let cache = c.data_dir(0).join("cache");
    let cache = cache.to_str().expect("utf-8 path");
    for h in &services {
        let mut args = vec![
            "exec",
            h.path,
            "--verify",
            "--fuel",
            FUEL,
            "--max-memory-mib",
            h.memory_mib,
            "--cache-dir",
            cache,
        ];
        args.extend(h.verify);
        let out = waft_cli(&args).await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "exec --verify {}: {:?}\n{text}",
            h.service,
            out.status
        );
        assert!(
            text.contains("deterministic: every history gave the same"),
            "exec --verify {}: {text}",
            h.service
        );
        let out = waft_cli(&["check", h.path, "--cache-dir", cache]).await;
        assert!(
            out.status.success(),
            "check {}: {}",
            h.service,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    tracing::info!("every hostile service has its batched sets on every node");
    let (_, last) = last_index(c).await;
    for i in 0..3 {
        wait_applied(c, i, last).await;
        for h in &services {
            let got = query(c, i, h.service, "get b7", api::Consistency::Stale).await;
            assert_eq!(
                got,
                Some(Answer::Ok(b"7".to_vec())),
                "{} on node {}",
                h.service,
                i + 1
            );
        }
    }
    let rebases: usize = (0..3).map(|i| in_log(c, i, "snapshot, on stderr")).sum();
    assert!(
        rebases > 0,
        "no guest snapshot printed: rebases and snapshots never ran"
    );
    eprintln!(
        "hostile paths: {} misbehaviours on 4 guests through single applies, batches, queries, \
         timers, rebases, a snapshot install, dry runs and the verifier; {rebases} guest \
         snapshots printed",
        services.iter().map(|h| h.misbehaviour.len()).sum::<usize>(),
    );
}
