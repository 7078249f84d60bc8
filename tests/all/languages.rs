//! Guests written in Python (componentize-py), JavaScript (ComponentizeJS) and C (clang with
//! wasi-libc and wit-bindgen's C bindings) behave exactly like the Rust kv guest: same replies,
//! same snapshot bytes (so any of them can replace another by hot-swap), deterministic on every
//! replica of a real cluster.
//!
//! The components are built by `tests/build.rs` (`scripts/test` installs the tools); a guest
//! that could not be built fails these tests, saying why.

use crate::support::cluster::{TestCluster, loaded_settings};
use crate::support::{apply_all, apply_batch_all, ctx, guest, query, runtime, text};
use tonic::transport::Channel;
use waft::pb::api::{self, waft_client::WaftClient};
use waft_testkit::guests::{EXAMPLE_KV, EXAMPLE_KV_C, EXAMPLE_KV_JS, EXAMPLE_KV_PYTHON};

/// Every kv command shape, with every error the Rust guest gives.
const SCRIPT: &[&str] = &[
    "put a 1",
    "put b two words",
    "put  c   spaced  value ",
    "put ü ünïcödé ✓",
    "put 𝄞 clef",
    "put \u{e000} private use",
    "get a",
    "get b",
    "get c",
    "get missing",
    "get",
    "put",
    "put onlykey",
    "get onlykey",
    "del a",
    "del a",
    "del",
    "cas b two words x",
    "cas b two three",
    "cas nokey x y",
    "cas b",
    "cas onlykey  now",
    "get onlykey",
    "scan",
    "scan b",
    "scan zzz",
    "",
    "   ",
    "frobnicate a",
    "PUT a 1",
    "say \"hi\"\\there",
    "put tab\tkey v",
];

const QUERIES: &[&str] = &["get b", "get nope", "scan", "scan c", "nope", "", "get"];

/// The Python, JavaScript and C kv guests, each with its name. A guest that was not built fails
/// the test: its build tool is installed by the test command (`scripts/test`).
pub(crate) fn foreign() -> Vec<(&'static str, &'static str)> {
    [
        ("python", EXAMPLE_KV_PYTHON),
        ("js", EXAMPLE_KV_JS),
        ("c", EXAMPLE_KV_C),
    ]
    .into_iter()
    .map(|(name, built)| {
        let path = built.unwrap_or_else(|why| {
            panic!("the {name} kv guest was not built, and this test needs it: {why}")
        });
        (name, path)
    })
    .collect()
}

#[test]
fn python_js_and_c_guests_answer_and_snapshot_exactly_like_the_rust_kv() {
    let rt = runtime();
    let mut rust = guest(&rt, EXAMPLE_KV);
    let expected = apply_all(&mut rust, 1, SCRIPT);
    let mut invalid = rust.apply(ctx(99), b"put \xff\xfe x");
    assert_eq!(text(invalid), Err("command is not UTF-8".to_owned()));
    let expected_queries: Vec<_> = QUERIES.iter().map(|q| query(&mut rust, q)).collect();
    let snapshot = rust.snapshot().expect("snapshot");
    // The script meant something: successes, rejections, ordered scans.
    assert!(expected.iter().filter(|r| r.is_ok()).count() > 10);
    assert!(expected.iter().filter(|r| r.is_err()).count() > 10);
    assert!(
        expected_queries[2]
            .as_ref()
            .is_ok_and(|s| s.lines().count() == 7)
    );

    for (name, path) in foreign() {
        let mut g = guest(&rt, path);
        let got = apply_all(&mut g, 1, SCRIPT);
        for ((cmd, want), got) in SCRIPT.iter().zip(&expected).zip(&got) {
            assert_eq!(want, got, "{name}: {cmd:?}");
        }
        invalid = g.apply(ctx(99), b"put \xff\xfe x");
        assert_eq!(
            text(invalid),
            Err("command is not UTF-8".to_owned()),
            "{name}"
        );
        for (q, want) in QUERIES.iter().zip(&expected_queries) {
            assert_eq!(want, &query(&mut g, q), "{name}: query {q:?}");
        }
        assert_eq!(
            snapshot,
            g.snapshot().expect("snapshot"),
            "{name}: snapshot bytes"
        );

        // Batches give the same replies as single applies.
        let replies = apply_batch_all(&mut guest(&rt, path), 1, SCRIPT);
        assert_eq!(expected, replies, "{name}: batch");

        // The Rust guest's snapshot restores into this one and back, byte for byte.
        let mut fresh = guest(&rt, path);
        fresh.restore(&snapshot).expect("restore the Rust snapshot");
        assert_eq!(query(&mut fresh, "scan"), expected_queries[2], "{name}");
        assert_eq!(fresh.snapshot().expect("snapshot"), snapshot, "{name}");
        let mut back = guest(&rt, EXAMPLE_KV);
        back.restore(&g.snapshot().expect("snapshot"))
            .expect("restore into Rust");
        assert_eq!(back.snapshot().expect("snapshot"), snapshot, "{name}");

        // A damaged snapshot is refused with the Rust guest's words and changes nothing.
        for (bad, says) in [
            (b"nope".to_vec(), "bad magic"),
            (snapshot[..snapshot.len() - 3].to_vec(), "truncated"),
            ([snapshot.as_slice(), b"x"].concat(), "trailing bytes"),
        ] {
            let e = fresh.restore(&bad).expect_err("refused");
            assert!(e.to_string().contains(says), "{name}: {e}");
            assert_eq!(fresh.snapshot().expect("snapshot"), snapshot, "{name}");
        }
    }
}

async fn client(addr: &str) -> WaftClient<Channel> {
    WaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

async fn deploy(addr: &str, service: &str, path: &str) -> api::DeployReply {
    let module = waft_testkit::wasm(path);
    let header = api::DeployHeader {
        service: service.to_owned(),
        size: module.len() as u64,
        ..Default::default()
    };
    // Compiling an 18 MiB component on every node of an in-process cluster on two cores can
    // cost an election; like the CLI, retry what was refused before it was proposed.
    for _ in 0..10 {
        let chunks = waft::pb::deploy_chunks_with(header.clone(), &module);
        match client(addr)
            .await
            .deploy(futures::stream::iter(chunks))
            .await
        {
            Ok(reply) => return reply.into_inner(),
            Err(e) if e.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            // The connection dropped mid-call (a loaded machine): the deploy may have gone
            // through. Look before deploying again, so a retry does not add a version.
            Err(e) if e.message().contains("transport error") => {
                if let Some(done) = deployed(addr, service, &module).await {
                    return done;
                }
            }
            Err(e) => panic!("deploy {path} as {service}: {e}"),
        }
    }
    panic!("deploy {path} as {service}: unavailable ten times");
}

/// The service's deploy of `module`, if it takes effect within 20 s.
async fn deployed(addr: &str, service: &str, module: &[u8]) -> Option<api::DeployReply> {
    let sha = waft::runtime::ModuleHash::of(module).to_hex();
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let Ok(reply) = client(addr)
            .await
            .list_services(api::ListServicesRequest {})
            .await
        else {
            continue;
        };
        if let Some(s) = reply
            .into_inner()
            .services
            .into_iter()
            .find(|s| s.name == service && s.module_sha256 == sha)
        {
            return Some(api::DeployReply {
                module_sha256: s.module_sha256,
                index: s.deployed_at_index,
                dry_run: false,
                version: s.version,
                unchanged: false,
                ..Default::default()
            });
        }
    }
    None
}

/// Submits `cmd` once: as one client session (exactly-once), retrying while the cluster says
/// UNAVAILABLE (an election while every node compiles a big component).
async fn submit(c: &mut WaftClient<Channel>, service: &str, cmd: &str) -> Result<String, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let sequence = SEQUENCE.fetch_add(1, Ordering::SeqCst) + 1;
    let request = api::SubmitRequest {
        service: service.to_owned(),
        payload: cmd.as_bytes().to_vec(),
        client_id: 0x1a2b_3c4d,
        sequence,
    };
    let mut tries = 0;
    let reply = loop {
        match c.submit(request.clone()).await {
            Ok(reply) => break reply.into_inner(),
            Err(e) if e.code() == tonic::Code::Unavailable && tries < 20 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!("submit {cmd:?} to {service}: {e}"),
        }
    };
    match reply.outcome {
        Some(api::submit_reply::Outcome::Ok(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Some(api::submit_reply::Outcome::Rejected(m)) => Err(m),
        other => panic!("{service}: {cmd:?}: {other:?}"),
    }
}

/// A linearizable query, retried while the cluster says UNAVAILABLE (as [`submit`]).
async fn read(c: &mut WaftClient<Channel>, service: &str, q: &str) -> Result<String, String> {
    let request = api::QueryRequest {
        service: service.to_owned(),
        payload: q.as_bytes().to_vec(),
        consistency: api::Consistency::Linearizable as i32,
    };
    let mut tries = 0;
    let reply = loop {
        match c.query(request.clone()).await {
            Ok(reply) => break reply.into_inner(),
            Err(e) if e.code() == tonic::Code::Unavailable && tries < 20 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!("query {q:?} on {service}: {e}"),
        }
    };
    match reply.outcome {
        Some(api::query_reply::Outcome::Ok(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Some(api::query_reply::Outcome::Rejected(m)) => Err(m),
        other => panic!("{service}: {q:?}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_js_and_c_guests_run_on_a_cluster_like_the_rust_kv_and_swap_with_it() {
    let foreign = foreign();
    // Three nodes in one process each compile two 18 MiB components while other tests run on
    // the same two cores: use the timeouts an operator would pick for a loaded machine (as
    // etcd's defaults: heartbeat 100 ms, election 1 s and up), so a slow heartbeat is not an
    // election every few seconds.
    let cluster = TestCluster::start(3, loaded_settings()).await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    // Deploy through a follower: an 18 MiB module is streamed, forwarded and replicated.
    let follower = cluster.addrs[(leader + 1) % 3].clone();
    deploy(&follower, "kv", EXAMPLE_KV).await;
    for (name, path) in &foreign {
        let reply = deploy(&follower, &format!("kv-{name}"), path).await;
        assert_eq!(reply.version, 1, "{name}");
    }
    let mut c = client(&follower).await;
    let mut expected = Vec::new();
    for cmd in SCRIPT {
        expected.push(submit(&mut c, "kv", cmd).await);
    }
    for (name, _) in &foreign {
        let service = format!("kv-{name}");
        for (cmd, want) in SCRIPT.iter().zip(&expected) {
            assert_eq!(
                want,
                &submit(&mut c, &service, cmd).await,
                "{name}: {cmd:?}"
            );
        }
        for q in QUERIES {
            assert_eq!(
                read(&mut c, "kv", q).await,
                read(&mut c, &service, q).await,
                "{name}: query {q:?}"
            );
        }
    }
    // Every replica holds the same bytes, and every language the same state.
    // Each node compiles each big component once, at low CPU priority: allow for a busy machine.
    let patience = std::time::Duration::from_secs(300);
    let last = cluster.node(leader).metrics().last_log_index;
    cluster
        .wait_applied_within(last.expect("entries"), patience)
        .await;
    let states = cluster.assert_identical().await;
    for (name, _) in &foreign {
        assert_eq!(states["kv"], states[&format!("kv-{name}")], "{name}");
    }
    // Hot-swap the Rust kv for each foreign one and back: the state carries over every time.
    let mut version = 1;
    for (name, path) in foreign.iter().copied().chain([("rust", EXAMPLE_KV)]) {
        let scan = read(&mut c, "kv", "scan").await;
        let reply = deploy(&follower, "kv", path).await;
        version += 1;
        assert_eq!(reply.version, version, "{name}");
        assert_eq!(read(&mut c, "kv", "scan").await, scan, "{name}");
        assert_eq!(
            submit(&mut c, "kv", &format!("put by {name}")).await,
            Ok("OK".into())
        );
        assert_eq!(read(&mut c, "kv", "get by").await, Ok(name.to_owned()));
    }
    let last = cluster.node(leader).metrics().last_log_index;
    cluster
        .wait_applied_within(last.expect("entries"), patience)
        .await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

/// The Python counter, written with the `waft_json` helper (typed JSON like the Rust SDK's
/// `JsonStateMachine`), answers every command and query like the Rust counter, rejects what
/// the Rust counter rejects, and each reads the other's snapshot.
#[test]
fn the_python_json_helper_gives_the_rust_counters_answers() {
    let path = waft_testkit::guests::EXAMPLE_COUNTER_PYTHON.unwrap_or_else(|why| {
        panic!("the Python counter guest was not built, and this test needs it: {why}")
    });
    json_helper_gives_the_rust_counters_answers(path);
}

/// The same with the JavaScript counter and its `waft_json.js` helper (64-bit integers as
/// BigInts, canonical snapshots).
#[test]
fn the_javascript_json_helper_gives_the_rust_counters_answers() {
    let path = waft_testkit::guests::EXAMPLE_COUNTER_JS.unwrap_or_else(|why| {
        panic!("the JavaScript counter guest was not built, and this test needs it: {why}")
    });
    json_helper_gives_the_rust_counters_answers(path);
}

fn json_helper_gives_the_rust_counters_answers(path: &str) {
    use waft_testkit::guests::EXAMPLE_COUNTER;
    let script = [
        r#"{"add":{"name":"hits","by":5}}"#,
        r#"{"add":{"name":"hits","by":-2}}"#,
        r#"{"add":{"name":"über","by":9223372036854775807}}"#,
        r#"{"add":{"name":"über","by":1}}"#,
        r#"{"add":{"name":"b","by":1}}"#,
        r#"{"reset":{"name":"b"}}"#,
        r#"{"reset":{"name":"b"}}"#,
        r#"{"add":{"name":"a","by":0}}"#,
    ];
    let malformed = [
        "not json",
        r#"{"add":{"name":"x"}}"#,
        r#"{"add":{"name":"x","by":"1"}}"#,
        r#"{"add":{"name":"x","by":true}}"#,
        r#"{"multiply":{"name":"x","by":2}}"#,
        r#""add""#,
        "[]",
    ];
    let queries = [
        r#""list""#,
        r#"{"get":{"name":"hits"}}"#,
        r#"{"get":{"name":"über"}}"#,
        r#"{"get":{"name":"nope"}}"#,
    ];
    let rt = runtime();
    let mut rust = guest(&rt, EXAMPLE_COUNTER);
    let mut other = guest(&rt, path);
    let want = apply_all(&mut rust, 1, &script);
    assert_eq!(apply_all(&mut other, 1, &script), want);
    assert!(want.iter().any(|r| r.is_err()) && want.iter().any(|r| r.is_ok()));
    for bad in malformed {
        let r = text(rust.apply(ctx(50), bad.as_bytes()));
        let p = text(other.apply(ctx(50), bad.as_bytes()));
        assert!(r.is_err(), "rust accepted {bad}");
        let p = p.expect_err(bad);
        assert!(p.starts_with("malformed command: "), "{bad}: {p}");
    }
    for q in queries {
        assert_eq!(query(&mut other, q), query(&mut rust, q), "{q}");
    }
    // Batches answer as single applies do.
    assert_eq!(apply_batch_all(&mut guest(&rt, path), 1, &script), want);
    // Each reads the other's snapshot; the other snapshot is canonical (the same state gives
    // the same bytes however it was reached).
    let from_other = other.snapshot().expect("snapshot");
    let mut rust2 = guest(&rt, EXAMPLE_COUNTER);
    rust2
        .restore(&from_other)
        .expect("the Rust counter reads it");
    let mut other2 = guest(&rt, path);
    other2
        .restore(&rust.snapshot().expect("snapshot"))
        .expect("the other counter reads the Rust one's");
    for q in queries {
        assert_eq!(query(&mut rust2, q), query(&mut rust, q), "{q}");
        assert_eq!(query(&mut other2, q), query(&mut rust, q), "{q}");
    }
    assert_eq!(other2.snapshot().expect("snapshot"), from_other);
    // A damaged snapshot is refused and changes nothing.
    for bad in [
        &b"{"[..],
        b"[]",
        br#"{"counters":{"a":1}}"#,
        br#"{"other":{}}"#,
    ] {
        let e = other2.restore(bad).expect_err("refused");
        assert!(e.to_string().contains("malformed snapshot"), "{e}");
        assert_eq!(other2.snapshot().expect("snapshot"), from_other);
    }
}
