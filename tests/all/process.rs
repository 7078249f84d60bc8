//! Three `waft node` processes driven through the `waft` CLI, like an operator would: init,
//! join, deploy, submit on a follower, query everywhere, SIGKILL the leader, keep writing,
//! restart it, and check that every node agrees.

use crate::support::free_addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use waft_testkit::guests::EXAMPLE_KV;

const BIN: &str = env!("CARGO_BIN_EXE_waft");

fn cli(endpoint: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .expect("run waft")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn spawn(id: u64, addr: &str, dir: &Path, join: Option<&str>) -> Child {
    let log = std::fs::File::create(dir.join(format!("node{id}.log"))).expect("log file");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--log",
        "info",
        "node",
        "--id",
        &id.to_string(),
        "--listen",
        addr,
        "--data-dir",
    ])
    .arg(dir.join(format!("node{id}")))
    .stdout(Stdio::null())
    .stderr(log);
    if let Some(seed) = join {
        cmd.args(["--join", seed]);
    }
    cmd.spawn().expect("spawn waft node")
}

/// Polls until `check` passes or 30 s go by.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}

fn status(addr: &str) -> Option<serde_json::Value> {
    let o = cli(addr, &["--output", "json", "cluster", "status"]);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn leader(addrs: &[String]) -> Option<u64> {
    addrs
        .iter()
        .filter_map(|a| status(a))
        .find(|s| s["role"] == "leader")
        .and_then(|s| s["node_id"].as_u64())
}

struct Nodes(Vec<Option<Child>>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn three_node_processes_survive_a_leader_kill() {
    crate::support::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let mut nodes = Nodes(vec![None, None, None]);
    nodes.0[0] = Some(spawn(1, &addrs[0], dir.path(), None));
    eventually("node 1 answers", || status(&addrs[0]).is_some());
    tracing::info!("init through the CLI, then two nodes join through node 1");
    let o = cli(&addrs[0], &["cluster", "init"]);
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eventually("node 1 leads", || leader(&addrs[..1]) == Some(1));
    nodes.0[1] = Some(spawn(2, &addrs[1], dir.path(), Some(&addrs[0])));
    nodes.0[2] = Some(spawn(3, &addrs[2], dir.path(), Some(&addrs[0])));
    eventually("three voters", || {
        status(&addrs[0]).is_some_and(|s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|x| x["voter"] == true).count() == 3)
        })
    });

    tracing::info!("deploy kv and submit through a follower");
    let o = cli(&addrs[1], &["deploy", EXAMPLE_KV, "--service", "kv"]);
    assert!(
        o.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = cli(&addrs[2], &["submit", "--service", "kv", "put k1 v1"]);
    assert_eq!(text(&o), "OK\n", "{}", String::from_utf8_lossy(&o.stderr));
    for a in &addrs {
        let o = cli(a, &["query", "--service", "kv", "get k1"]);
        assert_eq!(text(&o), "v1\n", "linearizable read at {a}");
    }

    tracing::info!("SIGKILL the leader, keep writing through the survivors");
    let killed = leader(&addrs).expect("a leader") as usize;
    let victim = nodes.0[killed - 1].as_mut().expect("running");
    victim.kill().expect("kill");
    victim.wait().expect("reap");
    nodes.0[killed - 1] = None;
    let survivor = &addrs[killed % 3];
    for i in 2..=6 {
        let o = cli(
            survivor,
            &["submit", "--service", "kv", &format!("put k{i} v{i}")],
        );
        assert_eq!(
            text(&o),
            "OK\n",
            "write {i} after the kill: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    tracing::info!("restart the killed node: it catches up and every node agrees");
    nodes.0[killed - 1] = Some(spawn(killed as u64, &addrs[killed - 1], dir.path(), None));
    let expected = "k1 v1\nk2 v2\nk3 v3\nk4 v4\nk5 v5\nk6 v6\n";
    for a in &addrs {
        eventually(&format!("{a} has every write"), || {
            text(&cli(
                a,
                &[
                    "query",
                    "--service",
                    "kv",
                    "scan k",
                    "--consistency",
                    "stale",
                ],
            )) == expected
        });
    }
    let o = cli(&addrs[killed - 1], &["services"]);
    let table = text(&o);
    assert!(
        table.starts_with("SERVICE") && table.contains("VERSION"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("kv") && l.split_whitespace().nth(1) == Some("1")),
        "{table}"
    );

    tracing::info!("a down endpoint is a clear error and a failure status");
    let down = free_addr();
    let o = cli(&down, &["submit", "--service", "kv", "put a 1"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach a waft node"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
