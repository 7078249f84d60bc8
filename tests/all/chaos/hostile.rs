//! The hostile-guest campaign on processes (issue 36): a Python guest that prints with flush
//! and raises uncaught exceptions, a JavaScript one that logs to stdout and stderr and throws,
//! a C one that prints with flush and aborts, and a Rust one that prints with flush and
//! panics, hundreds of times among ordinary commands, on three `waft node` processes while 16 clients write to another service. Before the fix the inline
//! apply path (a tokio worker) panicked in wasmtime-wasi's `block_on` and every node stopped
//! at the same index. At the end: every node alive, every call answered in words, no
//! acknowledged write lost, the other service unaffected, every replica's audit equal.
//!
//! Then, on the same cluster and under the same load, every misbehaviour on every path a guest
//! call takes (`hostile_paths.rs`).

use super::determinism::{audit_equal, last_index, submit, wait_applied};
use crate::support::procs::{ProcCluster, connect};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use waft::pb::api::{self, submit_reply::Outcome, waft_client::WaftClient};
use waft_testkit::guests::EXAMPLE_KV;

/// Rounds of (sets, print-flush, raise) on the Python guest.
const ROUNDS: u64 = 200;
/// Ordinary commands per round: enough that the service's average apply stays cheap, so its
/// batches take the inline path (on an async worker), where issue 36's panic happened.
const SETS_PER_ROUND: u64 = 3;
/// Clients writing to the kv service meanwhile.
const LOAD_CLIENTS: u64 = 16;

/// One load client: puts to kv until `stop`, each acknowledged with `OK`; returns its last
/// sequence (its value is what `get load{id}` must read at the end).
async fn kv_load(addrs: Vec<String>, id: u64, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) -> u64 {
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let put = format!("put load{id} {seq}");
        let outcome = submit(&addrs, "kv", put.as_bytes(), 0x10ad_0000 + id, seq).await;
        assert!(
            matches!(&outcome, Some(Outcome::Ok(r)) if r == b"OK"),
            "load client {id}, put {seq}: {outcome:?}"
        );
        acked.fetch_add(1, Ordering::Relaxed);
    }
    seq
}

/// A service's part of a round: its name, its client id, its set's key prefix, each
/// misbehaviour with what its answer must be, and every how many rounds it takes part (the
/// issue's two Python cases run every round; the other languages' less often, to keep CI
/// short).
type Plan = (
    &'static str,
    u64,
    &'static str,
    [(&'static str, Expect); 2],
    u64,
);

/// What a call must answer.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// `Ok` with these bytes.
    Ok(&'static str),
    /// `Trapped`, naming this.
    Trapped(&'static str),
}

impl Expect {
    fn check(self, got: &Option<Outcome>, what: &str) {
        let right = match (self, got) {
            (Expect::Ok(want), Some(Outcome::Ok(r))) => r == want.as_bytes(),
            (Expect::Trapped(want), Some(Outcome::Trapped(m))) => m.contains(want),
            _ => false,
        };
        assert!(right, "{what}: expected {self:?}, got {got:?}");
    }
}

async fn query(addr: &str, service: &str, q: &str) -> Option<api::query_reply::Outcome> {
    let ch = connect(addr).await?;
    WaftClient::new(ch)
        .query(api::QueryRequest {
            service: service.into(),
            payload: q.as_bytes().to_vec(),
            consistency: api::Consistency::Stale as i32,
        })
        .await
        .ok()?
        .into_inner()
        .outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guests_misbehaving_on_every_path_under_load_never_stop_a_node() {
    crate::support::init_tracing();
    let mut c = ProcCluster::start(3, super::hostile_paths::NODE_ARGS).await;
    c.deploy("kv", EXAMPLE_KV).await;
    // py, js and c; and evil in Rust, whose calls take microseconds: its batches surely take
    // the inline path.
    super::hostile_paths::deploy_all(&c).await;
    tracing::info!("16 clients write to kv throughout");
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..LOAD_CLIENTS)
        .map(|id| tokio::spawn(kv_load(c.addrs.clone(), id, stop.clone(), acked.clone())))
        .collect();

    tracing::info!("{ROUNDS} flushed prints and {ROUNDS} uncaught exceptions among sets");
    let plan: [Plan; 4] = [
        (
            "py",
            0xb0b,
            "k",
            [
                ("print-flush", Expect::Ok("printed")),
                (
                    "raise",
                    Expect::Trapped("ValueError: deliberate uncaught exception"),
                ),
            ],
            1,
        ),
        (
            "js",
            0x15,
            "j",
            [
                ("print-flush", Expect::Ok("printed")),
                // An Error nobody catches: a trap (ComponentizeJS aborts).
                ("throw", Expect::Trapped("guest panicked")),
            ],
            4,
        ),
        (
            "c",
            0xc,
            "c",
            [
                ("print-flush", Expect::Ok("printed")),
                ("abort", Expect::Trapped("deliberate abort")),
            ],
            4,
        ),
        (
            "evil",
            0xe7,
            "r",
            [
                ("print-flush 2", Expect::Ok("OK")),
                (
                    "panic-stderr",
                    Expect::Trapped("deliberate panic after a flushed stderr line"),
                ),
            ],
            1,
        ),
    ];
    let mut seq = 0;
    for n in 0..ROUNDS {
        for (service, client, prefix, misbehaviour, every) in &plan {
            if n % every != 0 {
                continue;
            }
            let sets =
                (0..SETS_PER_ROUND).map(|i| (format!("set {prefix}{n} {i}"), Expect::Ok("OK")));
            let bad = misbehaviour.iter().map(|(cmd, e)| (cmd.to_string(), *e));
            for (cmd, expect) in sets.chain(bad) {
                seq += 1;
                let o = submit(&c.addrs, service, cmd.as_bytes(), *client, seq).await;
                expect.check(&o, &format!("{service} round {n}: {cmd}"));
            }
        }
        for i in 0..3 {
            assert!(
                c.running(i),
                "node {} stopped after round {n}: {}",
                i + 1,
                c.log_tail(i, 20)
            );
        }
    }
    super::hostile_paths::every_path(&mut c).await;

    stop.store(true, Ordering::Relaxed);
    let mut last_seqs = Vec::new();
    for l in load {
        last_seqs.push(l.await.expect("a load client failed"));
    }
    let acked = acked.load(Ordering::Relaxed);
    assert!(acked > 0, "the load wrote nothing");

    tracing::info!("every node alive, every set on every node, kv's writes all there");
    let (_, last) = last_index(&c).await;
    for i in 0..3 {
        assert!(
            c.running(i),
            "node {} stopped: {}",
            i + 1,
            c.log_tail(i, 20)
        );
        wait_applied(&c, i, last).await;
        for n in [0, ROUNDS / 2, ROUNDS - 1] {
            let got = query(&c.addrs[i], "py", &format!("get k{n}")).await;
            let last = (SETS_PER_ROUND - 1).to_string().into_bytes();
            assert_eq!(got, Some(api::query_reply::Outcome::Ok(last)));
        }
        for (service, prefix) in [("js", "j"), ("c", "c")] {
            let got = query(&c.addrs[i], service, &format!("get {prefix}{}", ROUNDS - 4)).await;
            let last = (SETS_PER_ROUND - 1).to_string().into_bytes();
            assert_eq!(got, Some(api::query_reply::Outcome::Ok(last)), "{service}");
        }
        let got = query(&c.addrs[i], "evil", &format!("get r{}", ROUNDS - 1)).await;
        let last = (SETS_PER_ROUND - 1).to_string().into_bytes();
        assert_eq!(got, Some(api::query_reply::Outcome::Ok(last)));
        for (id, seq) in last_seqs.iter().enumerate() {
            let got = query(&c.addrs[i], "kv", &format!("get load{id}")).await;
            let want = api::query_reply::Outcome::Ok(seq.to_string().into_bytes());
            assert_eq!(got, Some(want), "node {}, load client {id}", i + 1);
        }
        assert_eq!(
            c.log(i).matches("host fault").count(),
            0,
            "node {} contained a host fault: {}",
            i + 1,
            c.log_tail(i, 30)
        );
    }

    tracing::info!("every replica's audit equal, nothing healed");
    let audit = audit_equal(&c).await;
    eprintln!(
        "hostile campaign: {ROUNDS} rounds of set/print-flush/raise on py, {acked} kv puts \
         acknowledged meanwhile, 3 nodes alive, audit at {} equal",
        audit.index
    );
}
