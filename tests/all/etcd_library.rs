//! An etcd client library's own test suite against waft: python-etcd3 0.12.0's
//! `tests/test_etcd3.py` (KV, transactions, watches, leases, locks, members, status, errors),
//! run once against a real etcd 3.4 and once against waft's etcd endpoint (three nodes, through
//! a follower). Every case that passes against etcd must pass against waft, except those listed
//! in [`DIFFERENCES`] with the reason. `scripts/test` installs the suite (its sdist) and its
//! pinned dependencies into `target/etcd3`; without them this test fails, saying so.

use crate::support::Etcd;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Cases that pass against etcd and not against waft, and why.
const DIFFERENCES: &[(&str, &str)] = &[(
    "TestEtcd3::test_snapshot",
    "Maintenance.Snapshot streams etcd's bbolt database file, which the test reads with \
     `etcdctl snapshot status`; waft's backups are its own format (`waft backup`), and the \
     endpoint does not serve Snapshot",
)];

fn suite() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/etcd3");
    let python = root.join("venv/bin/python");
    let tests = root.join("etcd3-0.12.0/tests/test_etcd3.py");
    assert!(
        python.exists() && tests.exists(),
        "python-etcd3's test suite is not installed in {}: run scripts/test (the test command \
         installs it)",
        root.display()
    );
    (python, tests)
}

/// Runs the suite against `endpoint`: each case's outcome (PASSED, FAILED, ERROR, SKIPPED).
async fn run(endpoint: &str) -> BTreeMap<String, String> {
    let (python, tests) = suite();
    let dir = tests
        .parent()
        .and_then(|p| p.parent())
        .expect("suite dir")
        .to_owned();
    let url = format!("http://{endpoint}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .current_dir(dir)
            .env("PYTHON_ETCD_HTTP_URL", url)
            .env("ETCDCTL_API", "3")
            .args([
                "-m",
                "pytest",
                "tests/test_etcd3.py",
                "-q",
                "-rA",
                "-p",
                "no:cacheprovider",
            ])
            .output()
            .expect("run pytest")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut outcomes = BTreeMap::new();
    for line in text.lines() {
        let Some((outcome, rest)) = line.split_once(' ') else {
            continue;
        };
        if !matches!(outcome, "PASSED" | "FAILED" | "ERROR" | "SKIPPED") {
            continue;
        }
        let case = rest
            .split(" - ")
            .next()
            .unwrap_or(rest)
            .trim_start_matches("tests/test_etcd3.py::")
            .to_owned();
        // A case that failed and then errored in its teardown counts as failed.
        outcomes.entry(case).or_insert_with(|| outcome.to_owned());
    }
    assert!(
        outcomes.len() > 50,
        "pytest ran too few cases against {endpoint}:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_etcd3s_own_suite_passes_against_waft_wherever_it_passes_against_etcd() {
    crate::support::require_tool("etcdctl", &["version"], "apt-get install etcd-client");
    suite();
    let real = Etcd::start();
    let (cluster, endpoint) = crate::etcd::etcd_cluster().await;
    crate::etcd::wait_healthy(&real.addr).await;
    let theirs = run(&real.addr).await;
    let ours = run(&endpoint).await;
    let mut missing = Vec::new();
    for (case, outcome) in &theirs {
        let on_waft = ours.get(case).map_or("not run", String::as_str);
        if outcome == "PASSED" && on_waft != "PASSED" {
            match DIFFERENCES.iter().find(|(c, _)| c == case) {
                Some((_, why)) => tracing::info!(%case, %why, "a known difference"),
                None => missing.push(format!("{case}: {on_waft} on waft")),
            }
        }
    }
    let passed = |m: &BTreeMap<String, String>| m.values().filter(|o| *o == "PASSED").count();
    tracing::info!(
        etcd = passed(&theirs),
        waft = passed(&ours),
        cases = theirs.len(),
        "python-etcd3's suite"
    );
    assert!(
        missing.is_empty(),
        "cases that pass against etcd but not against waft:\n{}",
        missing.join("\n")
    );
    // Every listed difference is still one (a fixed one must leave the list).
    for (case, _) in DIFFERENCES {
        assert_eq!(
            theirs.get(*case).map(String::as_str),
            Some("PASSED"),
            "{case} on etcd"
        );
        assert_ne!(
            ours.get(*case).map(String::as_str),
            Some("PASSED"),
            "{case} on waft"
        );
    }
    cluster.shutdown().await;
}
