//! Rolling restart under load: each node in turn stops (a leader hands leadership over first)
//! and comes back, while clients keep writing. No write fails with anything but a retryable
//! error, every acknowledged write is there afterwards, and the replicas agree. The same under
//! a rolling upgrade: nodes of "the next release" (played by a node that runs cluster versions
//! 1 and 2) replace those of this one a node at a time, one goes back to the old build while
//! the version has not risen, and the finalize raises it while the writes go on.

use crate::support::cluster::{TestCluster, test_settings};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use waft::pb::api::{self, waft_client::WaftClient};
use waft_testkit::guests::EXAMPLE_KV;

/// Writers that keep submitting to `kv` through every node until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    retries: Arc<AtomicU64>,
    writers: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(cluster: &TestCluster) -> Load {
        let channels: Vec<tonic::transport::Channel> = cluster
            .addrs
            .iter()
            .map(|a| {
                tonic::transport::Endpoint::from_shared(format!("http://{a}"))
                    .expect("endpoint")
                    .connect_timeout(Duration::from_millis(300))
                    .timeout(Duration::from_secs(3))
                    .connect_lazy()
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let retries = Arc::new(AtomicU64::new(0));
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let (channels, stop, retries) = (channels.clone(), stop.clone(), retries.clone());
            writers.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    seq += 1;
                    let key = format!("w{w}-{seq:05}");
                    let mut attempt = 0usize;
                    loop {
                        let ch = channels[(w as usize + attempt) % channels.len()].clone();
                        attempt += 1;
                        let r = WaftClient::new(ch)
                            .submit(api::SubmitRequest {
                                service: "kv".into(),
                                payload: format!("put {key} {seq}").into_bytes(),
                                client_id: 1000 + w,
                                sequence: seq,
                            })
                            .await;
                        match r {
                            Ok(reply) => {
                                assert!(
                                    matches!(
                                        reply.get_ref().outcome,
                                        Some(api::submit_reply::Outcome::Ok(_))
                                    ),
                                    "{reply:?}"
                                );
                                acked.push(key);
                                break;
                            }
                            Err(e) => {
                                // A status with a source was made here, by the connection (the
                                // node went away mid-call, e.g. its GOAWAY): the outcome is unknown,
                                // and retrying is safe because writes carry a client session.
                                let dropped = std::error::Error::source(&e).is_some();
                                assert!(
                                    dropped
                                        || matches!(
                                            e.code(),
                                            tonic::Code::Unavailable
                                                | tonic::Code::Cancelled
                                                | tonic::Code::DeadlineExceeded
                                                | tonic::Code::Unknown
                                        ),
                                    "a write failed with a non-retryable error: {e}"
                                );
                                assert!(attempt < 200, "write {key} never got through: {e}");
                                retries.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
                acked
            }));
        }
        Load {
            stop,
            retries,
            writers,
        }
    }

    /// Stops the writers, then checks that every acknowledged write is there and the replicas
    /// agree.
    async fn finish(self, cluster: &TestCluster) {
        let Load {
            stop,
            retries,
            writers,
        } = self;
        stop.store(true, Ordering::SeqCst);
        let mut acked = Vec::new();
        for w in writers {
            acked.extend(w.await.expect("writer"));
        }
        tracing::info!(
            writes = acked.len(),
            retries = retries.load(Ordering::Relaxed),
            "rolling restart done"
        );
        assert!(acked.len() > 50, "writers made progress: {}", acked.len());
        let leader = cluster.wait_leader().await;
        let (last, _) = cluster
            .write(crate::support::cluster::kv("put done 1"))
            .await;
        cluster.wait_applied(last).await;
        let scan = cluster
            .node(leader)
            .state()
            .query("kv", b"scan w".to_vec())
            .await
            .expect("scan");
        let present: std::collections::BTreeSet<String> = String::from_utf8_lossy(&scan)
            .lines()
            .map(|l| l.split(' ').next().unwrap_or("").to_owned())
            .collect();
        for key in &acked {
            assert!(present.contains(key), "acknowledged write {key} is missing");
        }
        cluster.assert_identical().await;
    }
}

/// Stops node `i`, starts it again (with the cluster's `configure` as it is now) and waits
/// until it caught up.
async fn roll(cluster: &mut TestCluster, i: usize) {
    let was_leader = cluster.wait_leader().await == i;
    tracing::info!(node = i, was_leader, "rolling restart: stop");
    cluster.stop(i).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.restart(i).await;
    let leader = cluster.wait_leader().await;
    let target = cluster.node(leader).metrics().last_log_index.unwrap_or(0);
    cluster
        .node(i)
        .raft()
        .wait(Some(Duration::from_secs(30)))
        .applied_index_at_least(Some(target), "restarted node caught up")
        .await
        .expect("caught up");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_load_loses_nothing() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let load = Load::start(&cluster);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        roll(&mut cluster, i).await;
    }
    load.finish(&cluster).await;
    cluster.shutdown().await;
}

/// This build, holding the cluster version until told (`--manual-finalize`).
fn old_build(config: &mut waft::node::NodeConfig) {
    config.auto_finalize = false;
}

/// "The next release": it also runs cluster version 2.
fn new_build(config: &mut waft::node::NodeConfig) {
    config.auto_finalize = false;
    config.cluster_versions = waft::version::Runs {
        oldest: 1,
        newest: 2,
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_upgrade_under_load_loses_nothing_and_raises_the_version() {
    let mut cluster = TestCluster::start_with(3, test_settings(), old_build).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let load = Load::start(&cluster);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.configure = new_build;
    for i in 0..3 {
        roll(&mut cluster, i).await;
    }
    // Every node runs the new build, the version is still 1: one goes back, and forth.
    cluster.configure = old_build;
    roll(&mut cluster, 0).await;
    assert_eq!(cluster.node(0).state().runs().newest, 1);
    cluster.configure = new_build;
    roll(&mut cluster, 0).await;
    for i in 0..3 {
        assert_eq!(cluster.node(i).state().cluster_version(), 1);
    }
    let leader = cluster.wait_leader().await;
    let mut admin = api::cluster_client::ClusterClient::new(
        crate::support::channel(&cluster.addrs[(leader + 1) % 3]).await,
    );
    let done = admin
        .finalize_upgrade(api::FinalizeUpgradeRequest {})
        .await
        .expect("finalize")
        .into_inner();
    assert_eq!((done.previous, done.cluster_version), (1, 2), "{done:?}");
    cluster.wait_applied(done.index).await;
    for i in 0..3 {
        assert_eq!(cluster.node(i).state().cluster_version(), 2, "node {i}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.finish(&cluster).await;
    cluster.shutdown().await;
}
