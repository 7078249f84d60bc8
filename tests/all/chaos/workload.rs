//! The clients of a chaos campaign and what they record.
//!
//! - kv clients do `put`, `cas` and linearizable `get` on a few keys, every written value
//!   unique, and record each operation's invocation and completion in one global order (a
//!   ticket taken before the request is sent and after the answer arrives). A write whose
//!   request fails or times out has an unknown outcome; the client resolves it the way a real
//!   client would, by retrying the same exactly-once sequence until an answer comes, so the
//!   operation spans from its first attempt to that answer. A write still unresolved long after
//!   the faults stopped is recorded as *unknown*: completing at the very end of the history (the
//!   checker may place it anywhere after its invocation, including "never", which is
//!   indistinguishable from "last"), and the client continues as a new process. A read that
//!   fails is dropped: it changed nothing.
//! - counter clients increment one counter with exactly-once sessions, retrying each increment
//!   (same client id and sequence) until it is acknowledged. The final value must equal the
//!   number of increments, and the values the increments returned must all differ: no
//!   increment lost, none applied twice.
//!
//! The history of each key is checked for linearizability with todc-utils' WGL checker
//! (Wing & Gong with Lowe's memoization) against a register with compare-and-swap.

use super::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use todc_utils::linearizability::WGLChecker;
use todc_utils::specifications::Specification;
use todc_utils::{Action, History};
use tonic::transport::{Channel, Endpoint};
use waft::pb::api::{self, waft_client::WaftClient};

/// What the outcome of a write was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    Failed,
    Unknown,
}

/// One register operation, with its result once known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A read and the value it saw (`None`: key not found).
    Get(Option<u32>),
    Put(u32, Outcome),
    Cas {
        expect: u32,
        new: u32,
        outcome: Outcome,
    },
}

/// A register per key, with compare-and-swap, as `kv` implements it.
pub struct KvRegister;

impl Specification for KvRegister {
    type State = Option<u32>;
    type Operation = Op;

    fn init() -> Option<u32> {
        None
    }

    fn apply(op: &Op, state: &Option<u32>) -> (bool, Option<u32>) {
        match *op {
            Op::Get(seen) => (seen == *state, *state),
            Op::Put(v, _) => (true, Some(v)),
            Op::Cas {
                expect,
                new,
                outcome,
            } => {
                let matches = *state == Some(expect);
                match outcome {
                    Outcome::Ok => (matches, if matches { Some(new) } else { *state }),
                    Outcome::Failed => (!matches, *state),
                    Outcome::Unknown => (true, if matches { Some(new) } else { *state }),
                }
            }
        }
    }
}

/// One finished (or abandoned) operation.
#[derive(Debug, Clone)]
struct Record {
    process: usize,
    key: usize,
    invoked: u64,
    /// `None`: unknown outcome (completes at the end of the history).
    completed: Option<u64>,
    op: Op,
}

/// Collects the history of a campaign.
#[derive(Default)]
pub struct Recorder {
    clock: AtomicU64,
    processes: AtomicUsize,
    records: Mutex<Vec<Record>>,
    pub stats: Stats,
    /// Where a non-linearizable key's history is written, for a person to read.
    pub dump_dir: Option<std::path::PathBuf>,
    pub name: String,
}

#[derive(Default, Debug)]
pub struct Stats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub unknown: AtomicU64,
    pub reads_dropped: AtomicU64,
    pub write_retries: AtomicU64,
    pub increments: AtomicU64,
    pub increment_retries: AtomicU64,
}

impl Recorder {
    /// A recorder that writes the history of a key that fails the check to `dir`.
    pub fn new(name: &str, dir: std::path::PathBuf) -> Recorder {
        Recorder {
            dump_dir: Some(dir),
            name: name.to_owned(),
            ..Recorder::default()
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn new_process(&self) -> usize {
        self.processes.fetch_add(1, Ordering::SeqCst)
    }

    fn push(&self, r: Record) {
        self.records.lock().expect("records").push(r);
    }

    /// Checks every key's history; returns (operations checked, keys that are not
    /// linearizable).
    pub fn check(&self, keys: usize) -> (usize, Vec<usize>) {
        let records = self.records.lock().expect("records").clone();
        let mut bad = Vec::new();
        for key in 0..keys {
            let mine: Vec<&Record> = records.iter().filter(|r| r.key == key).collect();
            if mine.is_empty() {
                continue;
            }
            let mut events: Vec<(u64, usize, Action<Op>)> = Vec::new();
            for r in &mine {
                events.push((r.invoked, r.process, Action::Call(r.op)));
                events.push((
                    r.completed.unwrap_or(u64::MAX),
                    r.process,
                    Action::Response(r.op),
                ));
            }
            events.sort_by_key(|(t, _, _)| *t);
            let history =
                History::from_actions(events.into_iter().map(|(_, p, a)| (p, a)).collect());
            if !WGLChecker::<KvRegister>::is_linearizable(history) {
                bad.push(key);
                if let Some(dir) = &self.dump_dir {
                    let mut text = String::new();
                    let mut sorted = mine.clone();
                    sorted.sort_by_key(|r| r.invoked);
                    for r in sorted {
                        text.push_str(&format!(
                            "p{:<4} [{:>7} .. {:>7}] {:?}\n",
                            r.process,
                            r.invoked,
                            r.completed.map_or("end".to_owned(), |c| c.to_string()),
                            r.op
                        ));
                    }
                    let _ = std::fs::create_dir_all(dir);
                    let _ = std::fs::write(dir.join(format!("{}-key{key}.txt", self.name)), text);
                }
            }
        }
        (records.len(), bad)
    }
}

/// A lazily connecting channel per node; requests time out after `timeout`.
pub fn channels(addrs: &[String], timeout: Duration) -> Vec<Channel> {
    addrs
        .iter()
        .map(|a| {
            Endpoint::from_shared(format!("http://{a}"))
                .expect("endpoint")
                .connect_timeout(Duration::from_millis(300))
                .timeout(timeout)
                .tcp_nodelay(true)
                .connect_lazy()
        })
        .collect()
}

fn key_name(key: usize) -> String {
    format!("key{key}")
}

/// A kv client: runs until `stop` is set, talking to random nodes. Writes carry an
/// exactly-once session (client id, sequence): one that fails or times out is retried with the
/// same sequence, on any node, until its outcome is known (a retry of an applied command gets
/// the first reply and is not applied again), so it completes when the answer arrives. Only a
/// write still unresolved `patience` after `stop` is recorded as unknown.
pub async fn kv_client(
    nodes: Vec<Channel>,
    rec: Arc<Recorder>,
    keys: usize,
    values: Arc<AtomicU64>,
    mut rng: Rng,
    stop: Arc<std::sync::atomic::AtomicBool>,
    patience: Duration,
) {
    let mut process = rec.new_process();
    let client_id = rng.next() | 1;
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let key = rng.below(keys as u64) as usize;
        let roll = rng.below(100);
        let invoked;
        let (op, completed) = if roll < 40 {
            let node = rng.below(nodes.len() as u64) as usize;
            let mut client = WaftClient::new(nodes[node].clone());
            invoked = rec.tick();
            let r = client
                .query(api::QueryRequest {
                    service: "kv".into(),
                    payload: format!("get {}", key_name(key)).into_bytes(),
                    consistency: api::Consistency::Linearizable as i32,
                })
                .await;
            let done = rec.tick();
            use api::query_reply::Outcome as Q;
            match r.map(|r| r.into_inner().outcome) {
                Ok(Some(Q::Ok(v))) => {
                    let v: u32 = String::from_utf8_lossy(&v)
                        .parse()
                        .expect("a value we wrote");
                    (Op::Get(Some(v)), Some(done))
                }
                Ok(Some(Q::Rejected(m))) if m.starts_with("key not found") => {
                    (Op::Get(None), Some(done))
                }
                Ok(other) => panic!("unexpected query outcome {other:?}"),
                Err(_) => {
                    rec.stats.reads_dropped.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        } else {
            let value = values.fetch_add(1, Ordering::SeqCst) as u32;
            let (payload, cas_expect) = if roll < 75 {
                (format!("put {} {value}", key_name(key)), None)
            } else {
                // Compare against a value someone wrote recently: often right, often not.
                let expect =
                    (values.load(Ordering::SeqCst) as u32).saturating_sub(1 + rng.below(6) as u32);
                (
                    format!("cas {} {expect} {value}", key_name(key)),
                    Some(expect),
                )
            };
            seq += 1;
            invoked = rec.tick();
            let mut stopped_at = None;
            let (outcome, done) = loop {
                let node = rng.below(nodes.len() as u64) as usize;
                let r = WaftClient::new(nodes[node].clone())
                    .submit(api::SubmitRequest {
                        service: "kv".into(),
                        payload: payload.clone().into_bytes(),
                        client_id,
                        sequence: seq,
                    })
                    .await;
                let done = rec.tick();
                use api::submit_reply::Outcome as S;
                match r.map(|r| r.into_inner().outcome) {
                    Ok(Some(S::Ok(_))) => break (Outcome::Ok, done),
                    Ok(Some(S::Rejected(m)))
                        if m.starts_with("compare failed") || m.starts_with("key not found") =>
                    {
                        break (Outcome::Failed, done);
                    }
                    Ok(other) => panic!("unexpected submit outcome {other:?}"),
                    Err(_) => {
                        rec.stats.write_retries.fetch_add(1, Ordering::Relaxed);
                        if stop.load(Ordering::SeqCst)
                            && stopped_at
                                .get_or_insert_with(tokio::time::Instant::now)
                                .elapsed()
                                > patience
                        {
                            break (Outcome::Unknown, done);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            let op = match cas_expect {
                None => Op::Put(value, outcome),
                Some(expect) => Op::Cas {
                    expect,
                    new: value,
                    outcome,
                },
            };
            (op, (outcome != Outcome::Unknown).then_some(done))
        };
        let counter = match (&op, completed) {
            (_, None) => &rec.stats.unknown,
            (
                Op::Cas {
                    outcome: Outcome::Failed,
                    ..
                },
                _,
            ) => &rec.stats.failed,
            _ => &rec.stats.ok,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        rec.push(Record {
            process,
            key,
            invoked,
            completed,
            op,
        });
        if completed.is_none() {
            // Its request may still be in flight: go on as a new process.
            process = rec.new_process();
        }
    }
}

/// Final linearizable reads of every key, recorded like any other read (retried until one
/// answers).
pub async fn final_reads(nodes: Vec<Channel>, rec: Arc<Recorder>, keys: usize) {
    let process = rec.new_process();
    for key in 0..keys {
        for attempt in 0.. {
            assert!(
                attempt < 300,
                "no final read of {} succeeded",
                key_name(key)
            );
            let mut client = WaftClient::new(nodes[attempt % nodes.len()].clone());
            let invoked = rec.tick();
            let r = client
                .query(api::QueryRequest {
                    service: "kv".into(),
                    payload: format!("get {}", key_name(key)).into_bytes(),
                    consistency: api::Consistency::Linearizable as i32,
                })
                .await;
            let completed = rec.tick();
            use api::query_reply::Outcome as Q;
            let seen = match r.map(|r| r.into_inner().outcome) {
                Ok(Some(Q::Ok(v))) => Some(String::from_utf8_lossy(&v).parse().expect("value")),
                Ok(Some(Q::Rejected(_))) => None,
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            rec.push(Record {
                process,
                key,
                invoked,
                completed: Some(completed),
                op: Op::Get(seen),
            });
            break;
        }
    }
}

/// The exactly-once counter client: each increment is retried with the same (client id,
/// sequence) until acknowledged, even after `stop` (within `patience`). Returns the values the
/// increments returned.
pub async fn counter_client(
    nodes: Vec<Channel>,
    rec: Arc<Recorder>,
    mut rng: Rng,
    stop: Arc<std::sync::atomic::AtomicBool>,
    patience: Duration,
) -> Vec<i64> {
    let client_id = rng.next() | 1;
    let mut replies = Vec::new();
    let mut seq = 0;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let stopped_at = std::sync::OnceLock::new();
        loop {
            let node = rng.below(nodes.len() as u64) as usize;
            let r = WaftClient::new(nodes[node].clone())
                .submit(api::SubmitRequest {
                    service: "counter".into(),
                    payload: br#"{"add":{"name":"c","by":1}}"#.to_vec(),
                    client_id,
                    sequence: seq,
                })
                .await;
            use api::submit_reply::Outcome as S;
            match r.map(|r| r.into_inner().outcome) {
                Ok(Some(S::Ok(v))) => {
                    replies.push(String::from_utf8_lossy(&v).parse().expect("a number"));
                    rec.stats.increments.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(other) => panic!("unexpected counter outcome {other:?}"),
                Err(_) => {
                    rec.stats.increment_retries.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::SeqCst) {
                        let since = stopped_at.get_or_init(tokio::time::Instant::now);
                        assert!(
                            since.elapsed() < patience,
                            "increment {seq} of client {client_id:x} never got through"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    replies
}

/// The counter's value, read linearizably (retried until a node answers).
pub async fn counter_value(nodes: &[Channel]) -> i64 {
    for attempt in 0..300 {
        let r = WaftClient::new(nodes[attempt % nodes.len()].clone())
            .query(api::QueryRequest {
                service: "counter".into(),
                payload: br#"{"get":{"name":"c"}}"#.to_vec(),
                consistency: api::Consistency::Linearizable as i32,
            })
            .await;
        use api::query_reply::Outcome as Q;
        match r.map(|r| r.into_inner().outcome) {
            Ok(Some(Q::Ok(v))) => {
                let v: serde_json::Value = serde_json::from_slice(&v).expect("json");
                return v["value"].as_i64().expect("value");
            }
            Ok(Some(Q::Rejected(_))) => return 0,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("the counter could not be read");
}

/// Distinct values of a multiset, for the duplicate check.
pub fn duplicates(values: &[i64]) -> Vec<i64> {
    let mut seen = BTreeMap::new();
    for v in values {
        *seen.entry(*v).or_insert(0) += 1;
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(v, _)| v)
        .collect()
}

#[cfg(test)]
mod checker_tests {
    //! The checker must be able to say no, or its "yes" means nothing.
    use super::*;

    fn rec(records: Vec<(usize, u64, Option<u64>, Op)>) -> Recorder {
        let r = Recorder::default();
        for (process, invoked, completed, op) in records {
            r.push(Record {
                process,
                key: 0,
                invoked,
                completed,
                op,
            });
        }
        r
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_not_linearizable() {
        let r = rec(vec![
            (0, 0, Some(1), Op::Put(1, Outcome::Ok)),
            (0, 2, Some(3), Op::Put(2, Outcome::Ok)),
            (1, 4, Some(5), Op::Get(Some(1))),
        ]);
        assert_eq!(r.check(1).1, vec![0]);
    }

    #[test]
    fn a_lost_acknowledged_write_is_not_linearizable() {
        let r = rec(vec![
            (0, 0, Some(1), Op::Put(1, Outcome::Ok)),
            (1, 2, Some(3), Op::Get(None)),
        ]);
        assert_eq!(r.check(1).1, vec![0]);
    }

    #[test]
    fn a_compare_that_failed_against_the_current_value_is_not_linearizable() {
        let r = rec(vec![
            (0, 0, Some(1), Op::Put(7, Outcome::Ok)),
            (
                0,
                2,
                Some(3),
                Op::Cas {
                    expect: 7,
                    new: 8,
                    outcome: Outcome::Failed,
                },
            ),
        ]);
        assert_eq!(r.check(1).1, vec![0]);
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened_and_concurrent_ops_may_reorder() {
        let r = rec(vec![
            (0, 0, None, Op::Put(1, Outcome::Unknown)),
            (1, 1, Some(2), Op::Get(None)),
            (2, 3, None, Op::Put(2, Outcome::Unknown)),
            (1, 4, Some(5), Op::Get(Some(2))),
            (3, 6, Some(9), Op::Put(3, Outcome::Ok)),
            (1, 7, Some(8), Op::Get(Some(3))),
        ]);
        assert!(r.check(1).1.is_empty());
        // ...but an unknown write seen, then unseen, is still a violation.
        let r = rec(vec![
            (0, 0, None, Op::Put(1, Outcome::Unknown)),
            (1, 1, Some(2), Op::Get(Some(1))),
            (1, 3, Some(4), Op::Get(None)),
        ]);
        assert_eq!(r.check(1).1, vec![0]);
    }
}

#[cfg(test)]
mod checker_agrees_with_a_simulation {
    //! Histories generated by a simulated atomic register (each operation takes effect at one
    //! instant inside its interval) are linearizable by construction: the checker must accept
    //! every one, at the sizes and concurrency the campaigns produce.
    use super::*;

    /// An open operation: invoked at, takes effect at, kind, value, expected value.
    type Open = (u64, u64, u8, u32, u32);

    fn simulate(seed: u64, processes: usize, ops: usize) -> Recorder {
        let mut rng = Rng::new(seed);
        let rec = Recorder::default();
        // Each process has at most one operation open: (invoked at, takes effect at, op kind).
        let mut open: Vec<Option<Open>> = vec![None; processes];
        let mut state: Option<u32> = None;
        let mut next_value = 1u32;
        let mut time = 0u64;
        let mut done = 0;
        while done < ops || open.iter().any(Option::is_some) {
            time += 1;
            let p = rng.below(processes as u64) as usize;
            match open[p] {
                None if done < ops => {
                    let effect = time + rng.below(30);
                    let kind = rng.below(3) as u8;
                    let expect = next_value.saturating_sub(1 + rng.below(3) as u32);
                    open[p] = Some((time, effect, kind, next_value, expect));
                    next_value += 1;
                    done += 1;
                }
                Some((invoked, effect, kind, value, expect)) if time > effect => {
                    // It took effect at `effect`; apply in effect order by processing here only
                    // when no other open op has an earlier effect time.
                    let earliest = open.iter().flatten().map(|o| o.1).min().unwrap_or(effect);
                    if earliest < effect {
                        continue;
                    }
                    let op = match kind {
                        0 => Op::Get(state),
                        1 => {
                            state = Some(value);
                            Op::Put(value, Outcome::Ok)
                        }
                        _ => {
                            let ok = state == Some(expect);
                            if ok {
                                state = Some(value);
                            }
                            Op::Cas {
                                expect,
                                new: value,
                                outcome: if ok { Outcome::Ok } else { Outcome::Failed },
                            }
                        }
                    };
                    let completed = time + rng.below(10);
                    rec.push(Record {
                        process: p,
                        key: 0,
                        invoked: invoked * 100 + p as u64,
                        completed: Some(completed * 100 + p as u64),
                        op,
                    });
                    // The process may only start again after this completion.
                    time = time.max(completed);
                    open[p] = None;
                }
                _ => {}
            }
        }
        rec
    }

    #[test]
    fn simulated_atomic_registers_are_accepted() {
        for seed in 0..200 {
            let rec = simulate(
                seed,
                2 + (seed % 7) as usize,
                100 + (seed as usize % 5) * 60,
            );
            let (n, bad) = rec.check(1);
            assert!(bad.is_empty(), "seed {seed}: {n} operations rejected");
        }
    }
}
