//! Three `waft node` processes driven through the `waft` CLI, like an operator would: init,
//! join, deploy, submit on a follower, query everywhere, SIGKILL the leader, keep writing,
//! restart it, and check that every node agrees.

use crate::support::bin::{Dev, waft};
use crate::support::free_addr;
use crate::support::procs::ProcCluster;
use std::process::Output;
use std::time::{Duration, Instant};
use waft_testkit::guests::EXAMPLE_KV;

fn cli(endpoint: &str, args: &[&str]) -> Output {
    waft()
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .expect("run waft")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
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

/// What node `addr` holds under kv's keys `k...`, read from its own state.
fn stale_scan(addr: &str) -> String {
    text(&cli(
        addr,
        &[
            "query",
            "--service",
            "kv",
            "scan k",
            "--consistency",
            "stale",
        ],
    ))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_processes_survive_a_leader_kill() {
    crate::support::init_tracing();
    let c = ProcCluster::unformed(3, &[]).await;
    // The CLI and the processes are driven synchronously, as an operator's shell would.
    tokio::task::spawn_blocking(move || survive_a_leader_kill(c))
        .await
        .expect("join");
}

fn survive_a_leader_kill(mut c: ProcCluster) {
    let addrs = c.addrs.clone();
    c.spawn(0, None);
    eventually("node 1 answers", || status(&addrs[0]).is_some());
    tracing::info!("init through the CLI, then two nodes join through node 1");
    let o = cli(&addrs[0], &["cluster", "init"]);
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eventually("node 1 leads", || leader(&addrs[..1]) == Some(1));
    c.spawn_with(1, None, &["--join", &addrs[0]]);
    // A seed list: a dead address first, then a host name (resolved, each address tried).
    let port0 = addrs[0].rsplit_once(':').expect("port").1;
    let seeds = format!("127.0.0.1:1,localhost:{port0}");
    c.spawn_with(2, None, &["--join", &seeds]);
    eventually("three voters", || {
        status(&addrs[0]).is_some_and(|s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|x| x["voter"] == true).count() == 3)
        })
    });
    // Each joined node says how far it came.
    for i in [1, 2] {
        eventually("a joined node says it caught up", || {
            c.log(i)
                .contains(&format!("node {} caught up: log to index", i + 1))
        });
    }

    tracing::info!("deploy kv and submit through a follower");
    let o = cli(&addrs[1], &["deploy", EXAMPLE_KV, "--service", "kv"]);
    assert!(
        o.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Not a terminal: no progress drawn.
    assert!(
        o.stderr.is_empty(),
        "{}",
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
    c.kill(killed - 1);
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

    tracing::info!("an endpoint list with the dead node first: the CLI goes on to the next");
    let list = [killed - 1, killed % 3, (killed + 1) % 3]
        .map(|i| addrs[i].clone())
        .join(",");
    let file = c.data_dir(0).with_file_name("listed.backup");
    let file = file.to_str().expect("utf-8 path");
    let listed: [&[&str]; 4] = [
        &["cluster", "status"],
        &["submit", "--service", "kv", "put x-list v"],
        &["services"],
        &["backup", file],
    ];
    for args in listed {
        let o = cli(&list, args);
        assert!(
            o.status.success(),
            "{args:?} with --endpoint {list}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = waft()
        .env("WAFT_ENDPOINT", &list)
        .args(["query", "--service", "kv", "get x-list"])
        .output()
        .expect("run waft");
    assert_eq!(text(&o), "v\n", "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::path::Path::new(file).exists(),
        "the backup was written"
    );

    tracing::info!("restart the killed node: it catches up and every node agrees");
    c.spawn(killed - 1, None);
    let expected = "k1 v1\nk2 v2\nk3 v3\nk4 v4\nk5 v5\nk6 v6\n";
    for a in &addrs {
        eventually(&format!("{a} has every write"), || {
            stale_scan(a) == expected
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

    tracing::info!("a follower loses its data directory and comes back with --join");
    let leader_id = leader(&addrs).expect("a leader") as usize;
    let wiped = leader_id % 3 + 1;
    c.kill(wiped - 1);
    std::fs::remove_dir_all(c.data_dir(wiped - 1)).expect("wipe");
    let o = cli(
        &addrs[leader_id - 1],
        &["submit", "--service", "kv", "put k7 v7"],
    );
    assert_eq!(text(&o), "OK\n", "{}", String::from_utf8_lossy(&o.stderr));
    c.spawn_with(wiped - 1, None, &["--join", &addrs[leader_id - 1]]);
    let expected = format!("{expected}k7 v7\n");
    eventually("the wiped node copied the log again", || {
        stale_scan(&addrs[wiped - 1]) == expected
    });
    eventually("three voters again", || {
        status(&addrs[leader_id - 1]).is_some_and(|s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|x| x["voter"] == true).count() == 3)
        })
    });
    let log = c.log(wiped - 1);
    assert!(
        log.contains(&format!("node {wiped} lost its data")),
        "the node says what happened: {log}"
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
    // A malformed entry is named, before anything is tried.
    let o = cli(
        &format!("{},not an address", addrs[0]),
        &["cluster", "status"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("\"not an address\" is not a node's address"),
        "{err}"
    );
    // A list of down nodes names each, for the client crate's commands and the others.
    let other = free_addr();
    let list = format!("{down},{other}");
    for args in [
        &["submit", "--service", "kv", "put a 1"][..],
        &["cluster", "status"],
    ] {
        let o = cli(&list, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            err.contains(&down) && err.contains(&other),
            "{args:?} names both down nodes: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waft_dev_serves_the_etcd_api_and_metrics_when_asked() {
    use waft::pb::etcd::{PutRequest, RangeRequest, kv_client::KvClient};
    let etcd = crate::support::bin::consecutive_ports();
    let metrics = crate::support::bin::consecutive_ports();
    let dev = Dev::start(&[
        "--etcd-base-port",
        &etcd.to_string(),
        "--metrics-base-port",
        &metrics.to_string(),
    ]);
    let ready = dev.banner.clone();
    // Each node's metrics, where the banner says; what deploy/ ships for Prometheus and
    // Grafana names only what the nodes of a real `waft` process serve.
    let mut served = Vec::new();
    for n in 0..3u16 {
        let at = format!("127.0.0.1:{}", metrics + n);
        assert!(
            ready.contains(&format!("metrics http://{at}/metrics")),
            "{ready}"
        );
        // A follower may not have applied the deploy yet when the banner shows.
        let etcd_version = "waft_service_version{service=\"etcd\"} ";
        let mut text = String::new();
        for _ in 0..300 {
            let response = crate::metrics::get(at.parse().expect("addr"), "/metrics").await;
            text = response.split("\r\n\r\n").nth(1).expect("body").to_owned();
            if text.contains(etcd_version) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(crate::metrics::value(&text, etcd_version.trim_end()), 1.0);
        for heap in [
            "waft_allocator_allocated_bytes",
            "waft_allocator_resident_bytes",
        ] {
            assert!(crate::metrics::value(&text, heap) > 0.0, "{heap}");
        }
        served.push(text);
    }
    crate::dashboards::check(&served.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        ready.contains("service `kv` (and `etcd`) deployed"),
        "{ready}"
    );
    assert!(
        ready.contains(&format!("etcdctl --endpoints=127.0.0.1:{}", etcd + 1)),
        "{ready}"
    );
    let mut kv = KvClient::connect(format!("http://127.0.0.1:{}", etcd + 1))
        .await
        .expect("connect to a follower's etcd API");
    let put = kv
        .put(PutRequest {
            key: b"from-dev".to_vec(),
            value: b"yes".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put")
        .into_inner();
    assert_eq!(put.header.expect("header").revision, 2);
    let mut other = KvClient::connect(format!("http://127.0.0.1:{}", etcd + 2))
        .await
        .expect("connect");
    let got = other
        .range(RangeRequest {
            key: b"from-dev".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(got.kvs[0].value, b"yes");
    let (status, stderr) = tokio::task::spawn_blocking(move || dev.stop())
        .await
        .expect("join");
    assert!(status.success(), "waft dev exited with {status}");
    // Ctrl-C stops every node's Raft before any server closes: one line per node, and no burst
    // of replication warnings about peers that are already gone.
    let stopping = stderr
        .split_once("stopping 3 nodes")
        .unwrap_or_else(|| panic!("waft dev says it stops its nodes: {stderr}"))
        .1;
    for n in 1..=3 {
        assert!(stopping.contains(&format!("node {n} stopped")), "{stderr}");
    }
    assert!(
        !stopping.contains("WARN") && !stopping.contains("ERROR"),
        "a quiet stop: {stopping}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_with_mdns() {
    crate::support::init_tracing();
    // Our own mDNS port and cluster name, so no other test or host on the network answers.
    let mdns_port = free_addr().rsplit_once(':').expect("port").1.to_owned();
    let name = format!("t{}", std::process::id());
    let mut c = ProcCluster::unformed(2, &["--mdns", &name]).await;
    c.set_env("WAFT_MDNS_PORT", &mdns_port);
    tokio::task::spawn_blocking(move || find_each_other(c, &mdns_port, &name))
        .await
        .expect("join");
}

fn find_each_other(mut c: ProcCluster, mdns_port: &str, name: &str) {
    let addrs = c.addrs.clone();
    c.spawn(0, None);
    eventually("node 1 answers", || status(&addrs[0]).is_some());
    let o = cli(&addrs[0], &["cluster", "init"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eventually("node 1 leads", || leader(&addrs[..1]) == Some(1));
    // A dead seed first: the node goes on to the nodes mDNS finds.
    let seeds = format!("127.0.0.1:1,mdns:{name}");
    c.spawn_with(1, None, &["--join", &seeds]);
    eventually("node 2 joined through mDNS and is a voter", || {
        status(&addrs[0]).is_some_and(|s| {
            s["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|x| x["id"] == 2 && x["voter"] == true && x["addr"] == addrs[1].as_str())
            })
        })
    });
    // A name mDNS cannot carry is refused before the node starts.
    let node9 = c.dir.path().join("node9");
    let o = waft()
        .env("WAFT_MDNS_PORT", mdns_port)
        .args(["node", "--id", "9", "--listen", &free_addr(), "--data-dir"])
        .arg(&node9)
        .args(["--mdns", "bad.name"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a usable cluster name"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!node9.exists(), "nothing was created");
}
