//! The rolling-upgrade campaign's nemesis: clients write and read (the campaign checks their
//! histories, exactly-once and the audit) while the nodes are upgraded one at a time, and
//! guests' timers keep falling due: a Rust guest's always, and from a release (below) those of
//! the Python and JavaScript lock services too (left out of CI's run for its time: their
//! compiles take minutes there).
//!
//! The old build is the `waft` binary named by `WAFT_UPGRADE_FROM` (a previous release, built
//! from its tag by `scripts/upgrade-test`), and the new one this tree's. Without it (CI) this
//! build plays both: the old build as it is (cluster version 1), the new one with the hidden
//! `--cluster-versions 1-2` (a release that adds cluster version 2).
//!
//! The plan, a step each: nodes 1, 2 and 3 swapped to the new build in turn (stopped, binary
//! swapped, started on the same data directory); node 1 back to the old build and forth again
//! (a downgrade works while the version has not risen); the upgrade finalized and every node
//! seen on the new version; then the leader killed now and then until the campaign's time is
//! up.

use super::{Faults, Rng, sleep};
use crate::support::procs::ProcCluster;
use std::path::PathBuf;
use std::time::Duration;
use waft::pb::api;

/// Every node holds the version until the plan finalizes it.
pub const NODE_ARGS: [&str; 1] = ["--manual-finalize"];

/// Steps in the plan (then leaders are killed until the time is up).
const PLAN: u64 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    Old,
    New,
}

/// The previous release's binary, when the campaign upgrades from one.
fn from_release() -> Option<PathBuf> {
    std::env::var_os("WAFT_UPGRADE_FROM").map(PathBuf::from)
}

/// Makes node `i` start on `build` from now on.
fn set(c: &mut ProcCluster, i: usize, build: Build) {
    match (build, from_release()) {
        (Build::Old, Some(bin)) => c.set_node_bin(i, Some(bin)),
        (Build::Old, None) => {
            c.set_node_bin(i, None);
            c.set_node_args(i, &[]);
        }
        (Build::New, Some(_)) => c.set_node_bin(i, None),
        (Build::New, None) => {
            c.set_node_bin(i, None);
            c.set_node_args(i, &["--cluster-versions", "1-2"]);
        }
    }
}

/// Every node on the old build, before the cluster starts.
pub fn start_old(c: &mut ProcCluster) {
    if let Some(bin) = from_release() {
        assert!(
            bin.exists(),
            "WAFT_UPGRADE_FROM={} does not exist",
            bin.display()
        );
    }
    for i in 0..c.len() {
        set(c, i, Build::Old);
    }
}

/// The version the finalize must reach: 2 when this build plays both, else what the new build
/// runs (it may run nothing newer than the old one: then the finalize changes nothing).
fn expected_version() -> u32 {
    match from_release() {
        Some(_) => waft::version::Runs::THIS_BUILD.newest,
        None => 2,
    }
}

/// The guests whose timers fall due during the upgrade (the campaign deploys kv and counter).
pub async fn deploy_guests(c: &ProcCluster) {
    c.deploy("ticker", waft_testkit::guests::TEST_TICKER).await;
    if from_release().is_some() {
        for (service, guest) in [
            ("locks-python", waft_testkit::guests::EXAMPLE_LOCKS_PYTHON),
            ("locks-js", waft_testkit::guests::EXAMPLE_LOCKS_JS),
        ] {
            let path = guest.unwrap_or_else(|why| panic!("{service} was not built: {why}"));
            c.deploy(service, path).await;
        }
    }
}

/// Sets timers in every timer guest: they fall due while the builds are mixed.
async fn set_timers(c: &ProcCluster, step: u64) {
    let mut commands = vec![("ticker", format!("many 20 s{step} 300"))];
    if from_release().is_some() {
        let lock = format!(r#"{{"acquire": {{"lock": "s{step}", "owner": "a", "ttl_ms": 300}}}}"#);
        commands.push(("locks-python", lock.clone()));
        commands.push(("locks-js", lock));
    }
    // A session per service: one client id with one sequence across services would answer
    // the second command as a retry of the first.
    for (n, (service, command)) in commands.into_iter().enumerate() {
        let client = 0x71 + n as u64;
        let out =
            super::determinism::submit(&c.addrs, service, command.as_bytes(), client, step + 1)
                .await;
        assert!(
            matches!(out, Some(api::submit_reply::Outcome::Ok(_))),
            "{service} {command}: {out:?}"
        );
    }
}

pub fn done(f: &Faults) -> bool {
    f.steps >= PLAN
}

pub async fn step(c: &mut ProcCluster, rng: &mut Rng, f: &mut Faults) {
    set_timers(c, f.steps).await;
    match f.steps {
        k @ 0..=2 => swap(c, k as usize, Build::New, f).await,
        3 => swap(c, 0, Build::Old, f).await,
        4 => swap(c, 0, Build::New, f).await,
        5 => finalize(c, f).await,
        _ => {
            if let Some(l) = c.wait_leader(Duration::from_secs(5)).await {
                c.kill(l);
                f.note(format!("SIGKILL leader node {}", l + 1));
                sleep(rng.millis(300, 1500)).await;
                c.spawn(l, None);
                f.note(format!("restart node {}", l + 1));
            }
        }
    }
    sleep(rng.millis(1000, 2500)).await;
}

/// Stops node `i` (SIGTERM, as an operator would), starts it on `build` and waits until it
/// answers.
async fn swap(c: &mut ProcCluster, i: usize, build: Build, f: &mut Faults) {
    c.terminate(i, Duration::from_secs(20)).await;
    set(c, i, build);
    c.spawn(i, None);
    f.note(format!("node {} restarted on the {build:?} build", i + 1));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.status(i).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "node {} never answered on the {build:?} build:\n{}",
            i + 1,
            c.log_tail(i, 30)
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// Finalizes the upgrade (again while a member is still starting), then waits until every
/// node applied the new version.
async fn finalize(c: &mut ProcCluster, f: &mut Faults) {
    let want = expected_version();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let reply = loop {
        let l = c.wait_leader(Duration::from_secs(10)).await;
        let mut cl = match l {
            Some(l) => c.cluster_client(l).await,
            None => None,
        };
        let r = match cl.as_mut() {
            Some(cl) => cl.finalize_upgrade(api::FinalizeUpgradeRequest {}).await,
            None => Err(tonic::Status::unavailable("no leader")),
        };
        match r {
            Ok(r) => break r.into_inner(),
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "the finalize kept failing: {e}"
            ),
        }
        sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(reply.cluster_version, want, "{reply:?}");
    f.note(format!(
        "upgrade finalized: cluster version {} -> {}",
        reply.previous, reply.cluster_version
    ));
    for i in 0..c.len() {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while c.status(i).await.is_none_or(|s| s.cluster_version < want) {
            assert!(
                std::time::Instant::now() < deadline,
                "node {} never reached cluster version {want}",
                i + 1
            );
            sleep(Duration::from_millis(100)).await;
        }
    }
}
