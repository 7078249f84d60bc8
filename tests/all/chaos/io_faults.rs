//! A disk that fails rather than fills (issue 36): each node runs over a fault layer
//! (`support/faults.rs`) that makes its fsyncs fail with EIO, its writes fail with EIO, or tears
//! a write in half, while clients write. Each fault in turn, on a follower and then on the
//! leader: the node stops, alone and saying why, and never acknowledges what it did not
//! persist (every write a client saw acknowledged is read back from every node at the end);
//! the others go on; once its disk works again it starts, catches up and agrees byte for byte.
//! Nothing is retried after a failed fsync: what the kernel kept of the pages is unknown
//! (PostgreSQL's "fsyncgate"), so the node stops and its peers supply what it lacks.

use super::determinism::{audit_equal, last_index, submit, wait_applied};
use crate::support::faults::IoFault;
use crate::support::procs::{ProcCluster, connect};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use waft::pb::api::{self, submit_reply::Outcome, waft_client::WaftClient};
use waft_testkit::guests::EXAMPLE_KV;

/// Clients writing throughout.
const WRITERS: u64 = 4;

/// Every put acknowledged so far: (client, sequence).
pub(super) type Acked = Arc<Mutex<Vec<(u64, u64)>>>;

/// One client: puts `k{id}-{seq} {seq}` until `stop`, each retried with its sequence (applied
/// once) until acknowledged, through whichever node answers.
pub(super) async fn writer(addrs: Vec<String>, id: u64, stop: Arc<AtomicBool>, acked: Acked) {
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let put = format!("put k{id}-{seq} {seq}");
        let outcome = submit(&addrs, "kv", put.as_bytes(), 0xf5_0000 + id, seq).await;
        assert!(
            matches!(&outcome, Some(Outcome::Ok(r)) if r == b"OK"),
            "writer {id}, put {seq}: {outcome:?}"
        );
        acked.lock().expect("acked").push((id, seq));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn acked_count(acked: &Acked) -> usize {
    acked.lock().expect("acked").len()
}

/// Waits until `more` further puts are acknowledged (the cluster goes on without the node).
pub(super) async fn more_acked(acked: &Acked, more: usize) {
    let target = acked_count(acked) + more;
    for _ in 0..600 {
        if acked_count(acked) >= target {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the cluster stopped acknowledging writes: {}",
        acked_count(acked)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_disk_fails_stops_alone_and_returns_without_loss() {
    crate::support::init_tracing();
    let mut c = ProcCluster::unformed(3, &["--snapshot-every", "500"]).await;
    let faults: Vec<_> = (0..3).map(|i| c.inject_io_faults(i)).collect();
    for i in 0..3 {
        c.spawn(i, None);
    }
    c.form().await;
    c.deploy("kv", EXAMPLE_KV).await;

    tracing::info!("a snapshot whose fsync fails, on an idle follower: it stops, saying why");
    let (leader, _) = last_index(&c).await;
    let victim = (leader + 1) % 3;
    faults[victim].arm(IoFault::Fsync);
    let mut cl = c.cluster_client(victim).await.expect("follower");
    let _ = cl.trigger_snapshot(api::TriggerSnapshotRequest {}).await;
    let stopped = c.wait_exited(victim, Duration::from_secs(60)).await;
    assert!(
        stopped.is_some_and(|s| !s.success()),
        "node {} wrote a snapshot it could not sync: {}",
        victim + 1,
        c.log_tail(victim, 20)
    );
    let said = super::disk::stop_line(&c, victim);
    eprintln!("a snapshot's fsync on a follower: {said}");
    assert!(said.contains("Input/output error"), "{said}");
    faults[victim].clear();
    c.spawn(victim, None);
    let (_, index) = last_index(&c).await;
    wait_applied(&c, victim, index).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| tokio::spawn(writer(c.addrs.clone(), id, stop.clone(), acked.clone())))
        .collect();
    more_acked(&acked, 50).await;

    let plan = [
        (IoFault::Fsync, false),
        (IoFault::Write, false),
        (IoFault::Short, false),
        (IoFault::Fsync, true),
        (IoFault::Short, true),
    ];
    for (fault, on_leader) in plan {
        let (leader, _) = last_index(&c).await;
        let victim = if on_leader { leader } else { (leader + 1) % 3 };
        let role = if on_leader { "leader" } else { "follower" };
        tracing::info!("{fault:?} on node {} (the {role})", victim + 1);
        let said_before = c.log(victim).matches("Input/output error").count();
        faults[victim].arm(fault);
        let stopped = c
            .wait_exited(victim, Duration::from_secs(60))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "node {} kept running on a disk failing with {fault:?}: {}",
                    victim + 1,
                    c.log_tail(victim, 20)
                )
            });
        assert!(
            !stopped.success(),
            "a node whose disk fails must not exit 0"
        );
        assert!(
            c.log(victim).matches("Input/output error").count() > said_before,
            "node {} says why it stopped: {}",
            victim + 1,
            c.log_tail(victim, 20)
        );
        eprintln!(
            "{fault:?} on the {role}: {}",
            super::disk::stop_line(&c, victim)
        );
        for i in (0..3).filter(|&i| i != victim) {
            assert!(
                c.running(i),
                "node {} stopped too: {}",
                i + 1,
                c.log_tail(i, 20)
            );
        }
        tracing::info!("the others go on without it");
        more_acked(&acked, 50).await;

        tracing::info!("its disk works again: it starts, catches up and agrees");
        faults[victim].clear();
        c.spawn(victim, None);
        let (_, index) = last_index(&c).await;
        wait_applied(&c, victim, index).await;
        assert!(
            c.running(victim),
            "node {} stopped again: {}",
            victim + 1,
            c.log_tail(victim, 20)
        );
        more_acked(&acked, 20).await;
    }

    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("a writer failed");
    }
    let acked = acked.lock().expect("acked").clone();
    every_put_everywhere(&c, &acked).await;
    let audit = audit_equal(&c).await;
    eprintln!(
        "io faults: fsync, write and torn-write failures on followers and leaders, each node \
         stopped alone and came back; {} acknowledged puts on every node; audit at {} equal",
        acked.len(),
        audit.index
    );
}

/// Waits until every node applied the last entry, then reads every acknowledged put back from
/// each.
pub(super) async fn every_put_everywhere(c: &ProcCluster, acked: &[(u64, u64)]) {
    let (_, index) = last_index(c).await;
    for i in 0..3 {
        wait_applied(c, i, index).await;
        let mut w = WaftClient::new(connect(&c.addrs[i]).await.expect("connect"));
        for (id, seq) in acked {
            let got = w
                .query(api::QueryRequest {
                    service: "kv".into(),
                    payload: format!("get k{id}-{seq}").into_bytes(),
                    consistency: api::Consistency::Stale as i32,
                })
                .await
                .expect("query")
                .into_inner()
                .outcome;
            assert_eq!(
                got,
                Some(api::query_reply::Outcome::Ok(seq.to_string().into_bytes())),
                "node {}: acknowledged put k{id}-{seq}",
                i + 1
            );
        }
    }
}
