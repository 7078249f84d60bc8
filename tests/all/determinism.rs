//! Determinism whatever the guest keeps outside its snapshot: replicas whose instances went
//! through different local events (a query first, a restart from a snapshot, a snapshot taken
//! at another moment) still agree; the verifier (`waft exec --verify`) names the guests whose
//! answers depend on their instance's history; old snapshot files still load.

use crate::support::cluster::{TestCluster, test_settings};
use crate::support::{ctx, runtime_with};
use std::sync::Arc;
use waft::runtime::{CheckpointPolicy, Guest, GuestModule, Runtime, RuntimeConfig};
use waft::types::{Request, Response};
use waft::verify::{Plan, verify};
use waft_testkit::guests::{
    EXAMPLE_KV, TEST_DET_JS, TEST_DET_PYTHON, TEST_FLAWED, TEST_FLAWED_PYTHON, TEST_NONDET,
};

/// A foreign guest's path; its build tool is installed by the test command, so a missing one
/// is a failure, not a skip.
fn built(guest: Result<&'static str, &'static str>) -> &'static str {
    guest.unwrap_or_else(|why| panic!("a guest this test needs was not built: {why}"))
}

/// A runtime whose guests rebase (a fresh instance restored from their own snapshot) every
/// `every` entries, so tests see rebases happen.
fn runtime_rebasing(every: usize) -> Runtime {
    runtime_with(RuntimeConfig {
        checkpoints: CheckpointPolicy {
            entries: every,
            bytes: usize::MAX,
        },
        cache_dir: Some(std::env::temp_dir().join("waft-test-artifacts")),
        ..RuntimeConfig::default()
    })
}

fn load(rt: &Runtime, path: &str) -> Arc<GuestModule> {
    rt.load(&waft_testkit::wasm(path)).expect("guest loads")
}

/// The service's first instance, opened at its deploy entry (index 1), as a replica does.
fn deployed(rt: &Runtime, module: &Arc<GuestModule>) -> Guest {
    rt.open(module, "det", rt.limits().clone(), ctx(1), None)
        .expect("opens")
}

fn replies(guest: &mut Guest, commands: &[&str], first: u64) -> Vec<Result<Vec<u8>, String>> {
    commands
        .iter()
        .zip(first..)
        .map(|(c, i)| guest.apply(ctx(i), c.as_bytes()).map_err(|e| e.to_string()))
        .collect()
}

/// Three replicas of one service, each with its own local events, must give the same replies
/// and the same final snapshot:
/// - a leader that answers queries, one before its first entry (a runtime that seeds something
///   at its first call must not seed it from a query), others between entries;
/// - a follower with no local event;
/// - a follower that restarts from the leader's snapshot (its history, as snapshot files carry
///   it) in the middle, and another time from its own.
fn replicas_agree(path: &str, commands: &[&str], read_query: &str) {
    let rt = runtime_rebasing(4);
    let module = load(&rt, path);
    let mut leader = deployed(&rt, &module);
    let mut follower = deployed(&rt, &module);
    let mut restarted = deployed(&rt, &module);
    let _ = leader.query(read_query.as_bytes());
    let half = commands.len() / 2;
    let mut expected = Vec::new();
    let mut got_leader = Vec::new();
    let mut got_restarted = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        let index = i as u64 + 2;
        if i == half {
            // A snapshot install from another replica: the history rebuilt in a new instance.
            restarted = rt
                .from_replay(&module, "det", rt.limits().clone(), &leader.replay_form())
                .expect("rebuilds from the leader's snapshot");
        }
        if i == half + 3 {
            restarted = rt
                .from_replay(
                    &module,
                    "det",
                    rt.limits().clone(),
                    &restarted.replay_form(),
                )
                .expect("rebuilds from its own snapshot");
        }
        expected.extend(replies(&mut follower, &[command], index));
        got_leader.extend(replies(&mut leader, &[command], index));
        got_restarted.extend(replies(&mut restarted, &[command], index));
        if i % 3 == 0 {
            let _ = leader.query(read_query.as_bytes());
            // A local read of the state (a deploy's validation, `waft services`).
            let _ = leader.state();
        }
    }
    assert!(follower.rebases() > 0, "{path}: rebases happened");
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(
            &got_leader[i],
            e,
            "{path}: the leader's reply to entry {}",
            i + 2
        );
        assert_eq!(
            &got_restarted[i],
            e,
            "{path}: the restarted replica's reply to entry {}",
            i + 2
        );
    }
    let want = follower.snapshot().expect("snapshot");
    assert_eq!(
        leader.snapshot().expect("snapshot"),
        want,
        "{path}: leader's state"
    );
    assert_eq!(
        restarted.snapshot().expect("snapshot"),
        want,
        "{path}: restarted state"
    );
}

#[test]
fn replicas_agree_with_rust_guests_that_keep_state_outside_their_snapshot() {
    let commands = [
        "gen", "global", "map a", "gen", "map b", "keep x", "global", "map c", "gen", "gen",
        "map d", "global", "gen",
    ];
    replicas_agree(TEST_FLAWED, &commands, "count");
    let commands: Vec<String> = (0..13).map(|i| format!("cmd{i}")).collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    replicas_agree(TEST_NONDET, &commands, "all");
}

#[test]
fn replicas_agree_with_a_python_guest_without_the_helper() {
    // The bug this guards: componentize-py seeds `random` at an instance's first call, so a
    // leader whose first call was a query, or a follower restored from a snapshot, drew other
    // numbers than the rest.
    let commands = [
        "gen", "global", "gen", "keep a", "gen", "gen", "global", "gen", "gen", "keep b", "gen",
    ];
    replicas_agree(built(TEST_FLAWED_PYTHON), &commands, "read");
}

#[test]
fn replicas_agree_with_python_and_js_guests_that_use_every_source() {
    let commands: Vec<String> = (0..9).map(|i| format!("c{i}")).collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    replicas_agree(built(TEST_DET_PYTHON), &commands, "observe");
    replicas_agree(built(TEST_DET_JS), &commands, "observe");
}

/// A runtime that never rebases by itself, as `waft exec --verify` uses.
fn verifier_runtime() -> Runtime {
    runtime_rebasing(usize::MAX)
}

fn plan(commands: &[&str], queries: &[&str]) -> Plan {
    Plan {
        commands: commands.iter().map(|c| c.as_bytes().to_vec()).collect(),
        queries: queries.iter().map(|q| q.as_bytes().to_vec()).collect(),
        timestamp_ms: 1_700_000_000_000,
    }
}

#[test]
fn the_verifier_accepts_guests_whose_answers_do_not_depend_on_their_history() {
    let rt = verifier_runtime();
    let kv = [
        "put a 1",
        "put b 2",
        "del a",
        "cas b 2 3",
        "put c 4",
        "get c",
        "nope",
    ];
    let cases = [
        (EXAMPLE_KV, &kv[..], &["scan", "get b"][..]),
        (
            TEST_FLAWED,
            &["keep a", "keep b", "keep c", "keep d"][..],
            &["count"][..],
        ),
        (
            built(TEST_DET_PYTHON),
            &["a", "b", "c", "d", "e"][..],
            &["observe"][..],
        ),
        (
            built(TEST_DET_JS),
            &["a", "b", "c", "d", "e"][..],
            &["observe"][..],
        ),
    ];
    for (path, commands, queries) in cases {
        let report = verify(&rt, &load(&rt, path), &plan(commands, queries)).expect("runs");
        assert!(report.ok(), "{path}: {:?}", report.findings);
        assert!(
            report.histories.len() >= 7,
            "{path}: {:?}",
            report.histories
        );
    }
}

/// The verifier's findings for these commands, as text.
fn findings(rt: &Runtime, path: &str, commands: &[&str], queries: &[&str]) -> Vec<String> {
    verify(rt, &load(rt, path), &plan(commands, queries))
        .expect("runs")
        .findings
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn assert_found(found: &[String], history: &str, entry: &str, what: &str) {
    assert!(
        found
            .iter()
            .any(|f| f.contains(history) && f.starts_with(entry)),
        "{what}: expected a finding for {history:?} at {entry:?}, got {found:#?}"
    );
}

#[test]
fn the_verifier_names_the_entry_and_history_of_each_flaw() {
    let rt = verifier_runtime();
    for path in [TEST_FLAWED, built(TEST_FLAWED_PYTHON)] {
        // A generator seeded when the instance starts.
        let found = findings(&rt, path, &["gen", "gen", "gen", "gen"], &["count"]);
        assert_found(
            &found,
            "restored from the snapshot after entry 1",
            "entry 2",
            path,
        );
        assert_found(&found, "a fresh instance per entry", "entry 2", path);
        assert_found(&found, "trap recovery", "entry 4", path);
        // State kept in a global that `snapshot` leaves out.
        let found = findings(&rt, path, &["global", "global", "global"], &["count"]);
        assert_found(
            &found,
            "restored from the snapshot after entry 1",
            "entry 2: one instance throughout replied \"2\"",
            path,
        );
        // A query that mutates: only the history with queries differs.
        let found = findings(&rt, path, &["keep a", "global", "keep b"], &["bump"]);
        assert_found(&found, "the queries run after every entry", "entry 2", path);
        // The same commands with a query that only reads are fine but for the global.
        let found = findings(&rt, path, &["keep a", "keep b", "keep c"], &["count"]);
        assert!(found.is_empty(), "{path}: {found:#?}");
    }
    // Python: a dict written in insertion order and restored sorted: the replies depend on
    // where the instance started, and the snapshot is not canonical.
    let py = built(TEST_FLAWED_PYTHON);
    let found = findings(
        &rt,
        py,
        &["map k2", "map k0", "map k1", "map k3"],
        &["count"],
    );
    assert_found(
        &found,
        "a fresh instance per entry",
        "entry 3",
        "a Python dict",
    );
    assert!(
        found.iter().any(|f| f.starts_with("final snapshot")),
        "a Python dict: the snapshot is not canonical: {found:#?}"
    );
    // A hash map written in iteration order: the snapshot is not canonical.
    let keys: Vec<String> = (0..12).map(|i| format!("map k{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let found = findings(&rt, TEST_FLAWED, &keys, &["count"]);
    // A restored map has room for 256 keys, a grown one for 16: their orders differ.
    assert_found(
        &found,
        "a fresh instance per entry",
        "entry ",
        "a HashMap in iteration order",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_in_snapshot_format_2_restores() {
    let backup = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/snapshot-format2.snap"),
    )
    .expect("fixture");
    let cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    let (_, response) = cluster
        .write(Request::Restore {
            backup,
            force: false,
            timestamp_ms: 1,
        })
        .await;
    assert_eq!(
        response,
        Response::Restored(vec!["kv".into(), "nondet".into()])
    );
    let node = cluster.node(0);
    let scan = node
        .state()
        .query("kv", b"scan".to_vec())
        .await
        .expect("scan");
    assert_eq!(
        String::from_utf8_lossy(&scan),
        "k1 v1\nk2 v2\nk3 v3\nk4 v4\nk5 v5\nk6 v6\n"
    );
    let record = node
        .state()
        .query("nondet", b"all".to_vec())
        .await
        .expect("record");
    assert_eq!(String::from_utf8_lossy(&record).lines().count(), 6);
    cluster.shutdown().await;
}

/// Runs `waft deploy` against `addr`; returns (success, stdout + stderr).
async fn deploy_cli(addr: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["--endpoint", addr, "deploy"];
    all.extend_from_slice(args);
    let out = crate::support::waft_cli(&all).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_replays_the_service_history_through_the_new_module_and_verifies_it() {
    use waft_testkit::guests::TEST_KV2;
    let mut cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let first = cluster
        .write(crate::support::cluster::kv("put a 1"))
        .await
        .0;
    for c in ["put b 2", "del a", "version", "put c 3"] {
        cluster.write(crate::support::cluster::kv(c)).await;
    }
    let addr = cluster.addrs[0].clone();

    tracing::info!("the same module answers every command as the running one does");
    let (ok, text) = deploy_cli(&addr, &["--dry-run", "-s", "kv", EXAMPLE_KV]).await;
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "replayed the 5 command(s) applied at indexes {first}..="
        )) && text.contains(": 0 replies differ"),
        "{text}"
    );
    tracing::info!("kv2 answers some differently: the dry run says which");
    let (ok, text) = deploy_cli(&addr, &["--dry-run", "-s", "kv", TEST_KV2]).await;
    assert!(ok, "{text}");
    let kv_module = |c: &TestCluster| {
        let services = c.node(0).state().services();
        services
            .iter()
            .find(|s| s.name == "kv")
            .expect("kv")
            .module
            .hash
            .to_hex()
    };
    let same_module = kv_module(&cluster);
    assert!(
        text.contains("replayed the 5 command(s)") && text.contains(": 1 reply differs"),
        "{text}"
    );
    assert!(text.contains("\"version\": running \"error: "), "{text}");

    tracing::info!("--replay FILE runs the file's commands from the state now");
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), "get b\nput d 4\nget d\n").expect("write");
    let path = file.path().to_str().expect("utf-8 path");
    let (ok, text) = deploy_cli(
        &addr,
        &["--dry-run", "--replay", path, "-s", "kv", EXAMPLE_KV],
    )
    .await;
    assert!(ok, "{text}");
    assert!(
        text.contains("3 command(s) from the file, from the state now")
            && text.contains(": 0 replies differ"),
        "{text}"
    );
    assert_eq!(
        kv_module(&cluster),
        same_module,
        "a dry run deploys nothing"
    );

    tracing::info!("--verify on a guest whose answers depend on its history");
    cluster.deploy("f", waft_testkit::wasm(TEST_FLAWED)).await;
    for _ in 0..4 {
        cluster
            .write(Request::Command {
                service: "f".into(),
                payload: b"gen".to_vec(),
                client: None,
                timestamp_ms: 1,
            })
            .await;
    }
    let (ok, text) = deploy_cli(&addr, &["--dry-run", "--verify", "-s", "f", TEST_FLAWED]).await;
    assert!(!ok, "findings fail the dry run: {text}");
    assert!(
        text.contains("NOT DETERMINISTIC") && text.contains("a fresh instance per entry"),
        "{text}"
    );
    // A real deploy (new limits, so not "unchanged") is refused without --force...
    let args = ["--verify", "--fuel", "2000000000", "-s", "f", TEST_FLAWED];
    let (ok, text) = deploy_cli(&addr, &args).await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("the determinism verifier found") && text.contains("--force"),
        "{text}"
    );
    let versions = |c: &TestCluster| {
        let services = c.node(0).state().services();
        services
            .iter()
            .find(|s| s.name == "f")
            .expect("f")
            .history
            .len()
    };
    assert_eq!(versions(&cluster), 1, "nothing was deployed");
    // ...and goes through with it.
    let (ok, text) = deploy_cli(
        &addr,
        &[
            "--verify",
            "--force",
            "--fuel",
            "2000000000",
            "-s",
            "f",
            TEST_FLAWED,
        ],
    )
    .await;
    assert!(ok, "{text}");
    assert_eq!(versions(&cluster), 2);
    tracing::info!("the forced deploy is recorded with its version, in snapshots too");
    let forced = |c: &TestCluster| {
        let services = c.node(0).state().services();
        let f = services.iter().find(|s| s.name == "f").expect("f");
        f.history.last().and_then(|v| v.forced.clone())
    };
    let findings = forced(&cluster).expect("the findings are kept with version 2");
    assert!(
        findings.contains("a fresh instance per entry"),
        "{findings}"
    );
    let out = crate::support::waft_cli(&["--endpoint", &addr, "services"]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("FORCED: version 2 was deployed with --force"),
        "{listed}"
    );
    let node = cluster.node(0);
    let applied = node.metrics().last_applied.expect("applied").index;
    node.raft().trigger().snapshot().await.expect("snapshot");
    node.raft()
        .wait(Some(std::time::Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied),
            "snapshot",
        )
        .await
        .expect("snapshot built");
    cluster.stop(0).await;
    cluster.restart(0).await;
    cluster.wait_leader().await;
    assert_eq!(forced(&cluster), Some(findings));
    let addr = cluster.addrs[0].clone();
    tracing::info!("a deterministic guest passes --verify with no findings");
    let (ok, text) = deploy_cli(&addr, &["--dry-run", "--verify", "-s", "kv", EXAMPLE_KV]).await;
    assert!(
        ok && text.contains("determinism verifier: no findings"),
        "{text}"
    );
    cluster.shutdown().await;
}
