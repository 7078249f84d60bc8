//! Leases under wrong wall clocks, scripted: the cases the random clock campaign
//! (`chaos_clocks`) reaches only by luck, each run every time.
//!
//! Three `waft node` processes with clocks of their own (libfaketime), the etcd endpoint on
//! each. A lease is granted under one leader, then leadership moves to a node whose clock is
//! far ahead, far behind, or jumps: the lease's key must live for the lease's TTL after the
//! grant was sent, in real time, and must be gone not long after. Before waft measured timers
//! on the leader's monotonic clock, a leader 120 s ahead expired a 60 s lease at once (issue
//! 36) and one 120 s behind kept it two minutes late.

use crate::support::procs::ProcCluster;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use waft::pb::api;
use waft::pb::etcd::{self as pb, kv_client::KvClient, lease_client::LeaseClient};
use waft_testkit::guests::EXAMPLE_ETCD_KV;

/// How long after its TTL a lease's key may outlive it (an election, a restart of the timer
/// task's look, a loaded machine); only the early side is a safety matter.
const LATE: Duration = Duration::from_secs(15);

struct Leases {
    cluster: ProcCluster,
    etcd: Vec<Channel>,
    metrics: Vec<std::net::SocketAddr>,
}

impl Leases {
    async fn start() -> Leases {
        let mut cluster = ProcCluster::unformed(3, &[]).await;
        cluster.skew_clocks();
        let (mut addrs, mut metrics) = (Vec::new(), Vec::new());
        for i in 0..cluster.len() {
            let (addr, m) = (crate::support::free_addr(), crate::support::free_addr());
            cluster.add_node_args(i, &["--etcd-listen", &addr, "--metrics-listen", &m]);
            addrs.push(addr);
            metrics.push(m.parse().expect("addr"));
        }
        for i in 0..cluster.len() {
            cluster.spawn(i, None);
        }
        cluster.form().await;
        cluster.deploy("etcd", EXAMPLE_ETCD_KV).await;
        let etcd = super::workload::channels(&addrs, Duration::from_secs(5));
        Leases {
            cluster,
            etcd,
            metrics,
        }
    }

    /// Node `i`'s `waft_log_clock_offset_seconds`.
    async fn offset(&self, i: usize) -> f64 {
        let text = crate::metrics::get(self.metrics[i], "/metrics").await;
        crate::metrics::value(&text, "waft_log_clock_offset_seconds")
    }

    /// Makes node `to` the leader.
    async fn lead(&self, to: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let leader = self.cluster.wait_leader(Duration::from_secs(10)).await;
            if leader == Some(to) {
                return;
            }
            assert!(Instant::now() < deadline, "node {} never led", to + 1);
            if let Some(l) = leader
                && let Some(mut c) = self.cluster.cluster_client(l).await
            {
                let _ = c
                    .transfer_leader(api::TransferLeaderRequest { to: to as u64 + 1 })
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Grants a lease of `ttl_secs` through node `via` and attaches `key` to it; returns when
    /// the grant was sent.
    async fn lease(&self, via: usize, key: &str, ttl_secs: i64) -> Instant {
        let sent = Instant::now();
        let id = LeaseClient::new(self.etcd[via].clone())
            .lease_grant(pb::LeaseGrantRequest {
                ttl: ttl_secs,
                id: 0,
            })
            .await
            .expect("lease grant")
            .into_inner()
            .id;
        KvClient::new(self.etcd[via].clone())
            .put(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"held".to_vec(),
                lease: id,
                ..Default::default()
            })
            .await
            .expect("put with the lease");
        sent
    }

    /// Whether `key` exists (a linearizable read through any node that answers).
    async fn exists(&self, key: &str) -> bool {
        loop {
            for ch in &self.etcd {
                if let Ok(r) = KvClient::new(ch.clone())
                    .range(pb::RangeRequest {
                        key: key.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .await
                {
                    return r.into_inner().count > 0;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Watches `key` until it is gone: it must live until `sent + ttl` and be gone by that
    /// plus [`LATE`]. Returns how long after `sent` it went.
    async fn lives_its_ttl(&self, key: &str, sent: Instant, ttl_secs: i64, what: &str) {
        let ttl = Duration::from_secs(ttl_secs as u64);
        loop {
            let asked = Instant::now();
            let there = self.exists(key).await;
            if !there {
                // Gone at or before the answer; present at least until the question.
                assert!(
                    asked >= sent + ttl,
                    "{what}: the {ttl_secs} s lease on {key} ended {:?} after its grant was \
                     sent, before its TTL",
                    asked - sent
                );
                return;
            }
            assert!(
                asked < sent + ttl + LATE,
                "{what}: the {ttl_secs} s lease on {key} still held {:?} after its grant was \
                 sent",
                asked - sent
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// libfaketime rereads a node's clock file every second.
async fn clock_settles() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_lives_its_ttl_in_real_time_whatever_the_leaders_clock_says() {
    crate::support::init_tracing();
    let l = Leases::start().await;

    // The case: granted under a true clock, then a leader 120 s ahead.
    l.lead(0).await;
    let sent = l.lease(0, "ahead", 8).await;
    l.cluster.set_clock(1, 120);
    clock_settles().await;
    l.lead(1).await;
    l.lives_its_ttl("ahead", sent, 8, "leader 120 s ahead")
        .await;
    // The metric shows it: the log's clock, stamped by node 2, is 2 minutes ahead of node 1's
    // and node 3's clocks, and agrees with node 2's own.
    for (i, lo, hi) in [(0, 100.0, 140.0), (2, 100.0, 140.0), (1, -20.0, 20.0)] {
        let offset = l.offset(i).await;
        assert!(
            (lo..hi).contains(&offset),
            "node {}'s waft_log_clock_offset_seconds is {offset}, not in {lo}..{hi}",
            i + 1
        );
    }

    // The log's clock is now 120 s ahead of true time (it never goes back). A leader that is
    // behind it, and behind true time too, must still let leases expire on time.
    l.cluster.set_clock(2, -120);
    clock_settles().await;
    l.lead(2).await;
    let sent = l.lease(2, "behind", 4).await;
    l.lives_its_ttl("behind", sent, 4, "leader 120 s behind")
        .await;

    // A leader whose clock jumps ahead while a lease runs, then back.
    l.cluster.set_clock(1, 0);
    clock_settles().await;
    l.lead(1).await;
    let sent = l.lease(1, "jump", 6).await;
    l.cluster.set_clock(1, 300);
    clock_settles().await;
    l.lives_its_ttl("jump", sent, 6, "leader's clock jumping 300 s ahead")
        .await;
    let sent = l.lease(1, "jump-back", 4).await;
    l.cluster.set_clock(1, -300);
    clock_settles().await;
    l.lives_its_ttl("jump-back", sent, 4, "leader's clock jumping 600 s back")
        .await;

    // Held across a leader change to a node whose clock is far ahead of everyone's.
    let sent = l.lease(1, "handover", 8).await;
    l.cluster.set_clock(0, 3600);
    clock_settles().await;
    l.lead(0).await;
    l.lives_its_ttl("handover", sent, 8, "new leader an hour ahead")
        .await;
}
