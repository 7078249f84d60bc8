//! The etcd v3 endpoint: Debian's `etcdctl` works against `--etcd-listen` unchanged, and the
//! same etcdctl session gives the same output (values, revisions, versions) against waft and
//! against a real etcd. Errors keep etcd's codes and wording.

use crate::support::Etcd;
use crate::support::cluster::{TestCluster, test_settings};
use std::process::Command;
use std::time::Duration;
use tonic::transport::Channel;
use waft::node::NodeConfig;
use waft::pb::etcd::{self as pb, kv_client::KvClient};
use waft_testkit::guests::EXAMPLE_ETCD_KV;

pub(crate) fn with_etcd(c: &mut NodeConfig) {
    c.etcd_listen = Some("127.0.0.1:0".parse().expect("addr"));
}

/// Runs etcdctl (v3 API) against `endpoint` with `args` and optional stdin.
pub(crate) async fn etcdctl(
    endpoint: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut all = vec![
        format!("--endpoints={endpoint}"),
        "--command-timeout=10s".into(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let input = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(&all)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(text) = input {
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
        drop(pipe);
        let o = child.wait_with_output().expect("etcdctl output");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

/// An etcdctl session covering put/get/del/txn and their options.
const SESSION: &[(&[&str], Option<&str>)] = &[
    (&["put", "foo", "bar"], None),
    (&["get", "foo"], None),
    (&["put", "foo", "baz", "--prev-kv"], None),
    (&["get", "foo", "-w", "json"], None),
    (&["put", "a", "1"], None),
    (&["put", "ab", "2"], None),
    (&["put", "b", "3"], None),
    (&["put", "a", "one"], None),
    (&["get", "a", "--prefix"], None),
    (&["get", "a", "--prefix", "-w", "json"], None),
    (&["get", "a", "c"], None),
    (&["get", "", "--prefix", "--keys-only"], None),
    (
        &["get", "", "--from-key", "--limit", "2", "-w", "json"],
        None,
    ),
    (
        &["get", "a", "--prefix", "--count-only", "-w", "json"],
        None,
    ),
    (
        &["get", "", "--prefix", "--sort-by=MODIFY", "--order=DESCEND"],
        None,
    ),
    (
        &["get", "", "--prefix", "--sort-by=VERSION", "--order=ASCEND"],
        None,
    ),
    (&["get", "missing"], None),
    (&["get", "foo", "--consistency=s"], None),
    (&["del", "missing"], None),
    (&["del", "ab"], None),
    (&["del", "a", "--prefix", "--prev-kv"], None),
    (
        &["txn", "-w", "json"],
        Some("value(\"foo\") = \"baz\"\n\nput foo qux\nget foo\n\nput foo nope\n\n"),
    ),
    (
        &["txn"],
        Some("value(\"foo\") = \"baz\"\n\nput foo no\n\nget foo\n\n"),
    ),
    (
        &["txn"],
        Some("version(\"foo\") > \"1\"\nmod(\"b\") < \"100\"\n\ndel b\n\n\n"),
    ),
    (
        &["txn"],
        Some("create(\"nope\") = \"0\"\n\nput nope yes\n\n\n"),
    ),
    (&["get", "", "--prefix", "-w", "json"], None),
    // Not here: reads at an older revision (etcd keeps history until compaction; waft keeps
    // none and says "compacted", tested below).
];

/// etcdctl's output with what legitimately differs between two clusters (their ids and Raft
/// terms) blanked.
pub(crate) fn normalize(out: &str) -> String {
    let mut text = out.to_owned();
    for field in ["cluster_id", "member_id", "raft_term"] {
        while let Some(at) = text.find(&format!("\"{field}\":")) {
            let start = at + field.len() + 3;
            let end = start + text[start..].find([',', '}']).unwrap_or(0);
            text.replace_range(at..end, &format!("\"{field}_\":0"));
        }
    }
    text
}

async fn run_session(endpoint: &str) -> Vec<String> {
    let mut outputs = Vec::new();
    for (args, stdin) in SESSION {
        let (ok, out, err) = etcdctl(endpoint, args, *stdin).await;
        outputs.push(format!(
            "{args:?} ok={ok}\n{}{}",
            normalize(&out),
            err.lines().last().unwrap_or("")
        ));
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_works_against_waft_and_matches_a_real_etcd() {
    crate::support::require_tool("etcdctl", &["version"], "apt-get install etcd-client");
    let cluster = TestCluster::start_with(3, test_settings(), with_etcd).await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    let endpoint = etcd_endpoint(&cluster, follower);

    // Before the guest is deployed: a clear error, not a hang.
    let (ok, _, err) = etcdctl(&endpoint, &["put", "x", "1"], None).await;
    assert!(
        !ok && err.contains("deploy examples/guests/etcd-kv"),
        "{err}"
    );
    cluster
        .deploy("etcd", waft_testkit::wasm(EXAMPLE_ETCD_KV))
        .await;

    // The plain commands, through a follower (forwarded to the leader).
    assert_eq!(
        etcdctl(&endpoint, &["put", "greeting", "hello"], None)
            .await
            .1,
        "OK\n"
    );
    assert_eq!(
        etcdctl(&endpoint, &["get", "greeting"], None).await.1,
        "greeting\nhello\n"
    );
    let (_, out, _) = etcdctl(
        &endpoint,
        &["txn"],
        Some("value(\"greeting\") = \"hello\"\n\nput greeting bye\n\nput greeting never\n\n"),
    )
    .await;
    assert_eq!(out, "SUCCESS\n\nOK\n");
    assert_eq!(
        etcdctl(&endpoint, &["del", "greeting"], None).await.1,
        "1\n"
    );
    let other = etcd_endpoint(&cluster, leader);
    assert_eq!(etcdctl(&other, &["get", "greeting"], None).await.1, "");

    // A real etcd, when installed: the same session must print the same things, revisions
    // included. Both stores start at revision 1, so waft's must first be fresh: redeploying
    // replaces it, and the revision counts from the redeploy's snapshot.
    let real = Etcd::start();
    let fresh = TestCluster::start_with(1, test_settings(), with_etcd).await;
    fresh.form().await;
    fresh
        .deploy("etcd", waft_testkit::wasm(EXAMPLE_ETCD_KV))
        .await;
    let waft_endpoint = etcd_endpoint(&fresh, 0);
    wait_healthy(&real.addr).await;
    let theirs = run_session(&real.addr).await;
    let ours = run_session(&waft_endpoint).await;
    for (t, o) in theirs.iter().zip(&ours) {
        assert_eq!(t, o, "etcd (left) and waft (right) differ");
    }
    fresh.shutdown().await;
    cluster.shutdown().await;
}

/// Three nodes serving etcd's API with the etcd-kv guest deployed, and a follower's endpoint
/// (every call through it is forwarded; watches are served from its own history).
pub(crate) async fn etcd_cluster() -> (TestCluster, String) {
    let (cluster, _, follower) = etcd_nodes().await;
    let endpoint = etcd_endpoint(&cluster, follower);
    (cluster, endpoint)
}

/// Node `i`'s etcd endpoint, as etcdctl takes it.
pub(crate) fn etcd_endpoint(cluster: &TestCluster, i: usize) -> String {
    cluster
        .node(i)
        .etcd_addr()
        .expect("etcd endpoint")
        .to_string()
}

/// The same three nodes, with the leader's and a follower's index.
pub(crate) async fn etcd_nodes() -> (TestCluster, usize, usize) {
    let cluster = TestCluster::start_with(3, test_settings(), with_etcd).await;
    cluster.form().await;
    cluster
        .deploy("etcd", waft_testkit::wasm(EXAMPLE_ETCD_KV))
        .await;
    let leader = cluster.wait_leader().await;
    (cluster, leader, (leader + 1) % 3)
}

/// Waits (up to 20 s) until the etcd at `addr` answers.
pub(crate) async fn wait_healthy(addr: &str) {
    for _ in 0..100 {
        if etcdctl(addr, &["endpoint", "health"], None).await.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn kv(addr: std::net::SocketAddr) -> KvClient<Channel> {
    KvClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_api_errors_keep_etcds_codes_and_change_nothing() {
    let cluster = TestCluster::start_with(3, test_settings(), with_etcd).await;
    cluster.form().await;
    let deployed = cluster
        .deploy("etcd", waft_testkit::wasm(EXAMPLE_ETCD_KV))
        .await;
    // Serializable reads below are answered by each node from its own state: every node must
    // have applied the deploy (a stale read does not wait for a deploy still compiling).
    cluster.wait_applied(deployed).await;
    let mut c = kv(cluster.node(1).etcd_addr().expect("etcd")).await;
    let put = |key: &str, value: &str| pb::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    };
    let r = c.put(put("k", "v1")).await.expect("put").into_inner();
    let rev = r.header.expect("header").revision;
    assert_eq!(
        rev, 2,
        "a fresh store is at revision 1; the first put makes it 2"
    );
    let h = c
        .put(put("k", "v2"))
        .await
        .expect("put")
        .into_inner()
        .header
        .expect("header");
    assert_eq!(h.revision, 3);
    let cluster_id = cluster.node(1).cluster_id();
    assert_eq!(h.member_id, waft::etcd::member_id(cluster_id.as_deref(), 1));
    assert!(h.cluster_id != 0 && h.raft_term >= 1, "{h:?}");

    let cases: Vec<(tonic::Status, tonic::Code, &str)> = vec![
        (
            c.put(put("", "x")).await.expect_err("empty key"),
            tonic::Code::InvalidArgument,
            "etcdserver: key is not provided",
        ),
        (
            c.put(pb::PutRequest {
                lease: 7,
                ..put("k", "x")
            })
            .await
            .expect_err("lease"),
            tonic::Code::NotFound,
            "etcdserver: requested lease not found",
        ),
        (
            c.put(pb::PutRequest {
                ignore_value: true,
                ..put("nokey", "")
            })
            .await
            .expect_err("ignore_value"),
            tonic::Code::InvalidArgument,
            "etcdserver: key not found",
        ),
        (
            c.range(pb::RangeRequest {
                key: b"k".to_vec(),
                revision: 2,
                ..Default::default()
            })
            .await
            .expect_err("old revision"),
            tonic::Code::OutOfRange,
            "compacted",
        ),
        (
            c.range(pb::RangeRequest {
                key: b"k".to_vec(),
                revision: 99,
                ..Default::default()
            })
            .await
            .expect_err("future revision"),
            tonic::Code::OutOfRange,
            "future revision",
        ),
        (
            c.txn(pb::TxnRequest {
                success: (0..2)
                    .map(|_| pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(put("d", "x"))),
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect_err("duplicate"),
            tonic::Code::InvalidArgument,
            "duplicate key given in txn request",
        ),
        (
            c.txn(pb::TxnRequest {
                success: (0..129)
                    .map(|i| pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(put(
                            &format!("m{i}"),
                            "x",
                        ))),
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect_err("too many"),
            tonic::Code::InvalidArgument,
            "too many operations in txn request",
        ),
    ];
    for (e, code, says) in cases {
        assert_eq!(e.code(), code, "{e}");
        assert!(e.message().contains(says), "{e}");
    }
    // A transaction that fails half-way changes nothing.
    let e = c
        .txn(pb::TxnRequest {
            success: vec![
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put("half", "x"))),
                },
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        ignore_value: true,
                        ..put("nokey", "")
                    })),
                },
            ],
            ..Default::default()
        })
        .await
        .expect_err("second op fails");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let r = c
        .range(pb::RangeRequest {
            key: b"\0".to_vec(),
            range_end: b"\0".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    let keys: Vec<_> = r
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert_eq!(keys, ["k"]);
    assert_eq!(
        r.header.expect("header").revision,
        3,
        "nothing moved the revision"
    );
    assert_eq!(r.kvs[0].version, 2);
    assert_eq!(r.kvs[0].create_revision, 2);
    assert_eq!(r.kvs[0].mod_revision, 3);

    // Serializable reads and read-only transactions are answered by the node itself.
    for i in 0..3 {
        let mut c = kv(cluster.node(i).etcd_addr().expect("etcd")).await;
        let r = c
            .range(pb::RangeRequest {
                key: b"k".to_vec(),
                serializable: true,
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner();
        assert_eq!(r.kvs[0].value, b"v2", "node {i}");
        let t = c
            .txn(pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                        key: b"k".to_vec(),
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            })
            .await
            .expect("read-only txn")
            .into_inner();
        assert!(t.succeeded);
        assert_eq!(t.header.expect("header").revision, 3);
    }
    let last = cluster
        .node(cluster.wait_leader().await)
        .metrics()
        .last_log_index;
    cluster.wait_applied(last.expect("entries")).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

/// The JSON etcdctl prints for `args` (`-w json`), parsed.
async fn etcdctl_json(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-w", "json"]);
    let (ok, out, err) = etcdctl(endpoint, &all, None).await;
    assert!(ok, "etcdctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcdctl {args:?} printed {out:?}: {e}"))
}

/// The keys of a JSON object, sorted, recursively (an array's elements' keys together): the
/// shape etcdctl prints, without the values.
fn shape(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(map) = v.as_object() {
        for (k, v) in map {
            out.push(k.clone());
            let inner: Vec<&serde_json::Value> = match v.as_array() {
                Some(items) => items.iter().collect(),
                None => vec![v],
            };
            for item in inner {
                out.extend(shape(item).into_iter().map(|s| format!("{k}.{s}")));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `etcdctl member list` and `etcdctl endpoint status` work against waft: every member once,
/// named, with its peer address (and the contacted node's client address), the leader and Raft
/// term and indexes as the node sees them, the etcd guest's size as the database size; the
/// JSON has the shape a real etcd's has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_member_list_and_endpoint_status_work_against_waft() {
    crate::support::require_tool("etcdctl", &["version"], "apt-get install etcd-client");
    let (cluster, leader, follower) = etcd_nodes().await;
    let endpoint = etcd_endpoint(&cluster, follower);
    assert!(etcdctl(&endpoint, &["put", "a", "1"], None).await.0);
    // Status reports what the node asked has applied: let it catch up first.
    let last = cluster
        .node(leader)
        .metrics()
        .last_log_index
        .expect("a log");
    cluster.wait_applied(last).await;

    let list = etcdctl_json(&endpoint, &["member", "list"]).await;
    let members = list["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{list}");
    let me = list["header"]["member_id"].as_u64().expect("member id");
    let mut ids: Vec<u64> = members
        .iter()
        .map(|m| m["ID"].as_u64().expect("ID"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct ids: {list}");
    for (i, addr) in cluster.addrs.iter().enumerate() {
        let m = members
            .iter()
            .find(|m| m["name"] == format!("waft-{i}"))
            .unwrap_or_else(|| panic!("member waft-{i} in {list}"));
        assert_eq!(m["peerURLs"][0], format!("http://{addr}"));
        if i == follower {
            assert_eq!(m["ID"].as_u64(), Some(me));
            assert_eq!(m["clientURLs"][0], format!("http://{endpoint}"));
        }
    }
    let (ok, table, err) = etcdctl(&endpoint, &["member", "list"], None).await;
    assert!(
        ok && table.lines().count() == 3 && table.contains("started"),
        "{table}{err}"
    );

    let status = etcdctl_json(&endpoint, &["endpoint", "status"]).await;
    let s = &status[0]["Status"];
    assert_eq!(s["version"], waft::etcd::API_VERSION);
    assert_eq!(s["header"]["member_id"].as_u64(), Some(me));
    let leader_id = members
        .iter()
        .find(|m| m["name"] == format!("waft-{leader}"))
        .and_then(|m| m["ID"].as_u64());
    assert_eq!(s["leader"].as_u64(), leader_id, "{status}");
    assert!(s["dbSize"].as_i64().is_some_and(|n| n > 0), "{status}");
    assert!(s["raftIndex"].as_u64().is_some_and(|n| n > 0), "{status}");
    assert!(
        s["raft_term"]
            .as_u64()
            .or(s["raftTerm"].as_u64())
            .is_some_and(|t| t >= 1),
        "{status}"
    );
    assert!(
        s["header"]["revision"].as_i64().is_some_and(|r| r >= 2),
        "{status}"
    );
    let (ok, table, err) = etcdctl(&endpoint, &["endpoint", "status"], None).await;
    assert!(
        ok && table.contains(waft::etcd::API_VERSION),
        "{table}{err}"
    );

    // The same commands against a real etcd print the same JSON shape.
    let real = Etcd::start();
    wait_healthy(&real.addr).await;
    let theirs = etcdctl_json(&real.addr, &["member", "list"]).await;
    assert_eq!(
        shape(&theirs),
        shape(&list),
        "member list: etcd {theirs} vs waft {list}"
    );
    let theirs = etcdctl_json(&real.addr, &["endpoint", "status"]).await;
    assert_eq!(
        shape(&theirs[0]),
        shape(&status[0]),
        "endpoint status: etcd {theirs} vs waft {status}"
    );
    cluster.shutdown().await;
}
