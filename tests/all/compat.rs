//! Compatibility that cannot rot: every release's fixtures (`tests/fixtures/release-*/`, written
//! by `scripts/make-fixtures` with that release's build, never by hand) are read by this build,
//! which must answer what that release answered: its data directory restarted as a node (the
//! snapshot, then every kind of log entry after it), its backup and its snapshot file each
//! seeded into a new data directory. A fixture of a format this build does not know is refused
//! with the formats named, and nothing is written.

use crate::support::bin::waft;
use crate::support::free_addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("release-"))
        })
        .collect();
    out.sort();
    out
}

/// What a fixture's services answered (`answers.jsonl`) at one point (`at`): each query's
/// outcome, and each service's version.
struct Answers {
    queries: Vec<(String, String, serde_json::Value)>,
    versions: Vec<(String, u64)>,
}

fn answers(fixture: &Path, at: &str) -> Answers {
    let text = std::fs::read_to_string(fixture.join("answers.jsonl")).expect("answers.jsonl");
    let mut out = Answers {
        queries: Vec::new(),
        versions: Vec::new(),
    };
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        if v["at"] != at {
            continue;
        }
        let service = v["service"].as_str().expect("service").to_owned();
        match v["query"].as_str() {
            Some(q) => out
                .queries
                .push((service, q.to_owned(), v["answer"].clone())),
            None => out
                .versions
                .push((service, v["version"].as_u64().expect("version"))),
        }
    }
    assert!(
        !out.queries.is_empty(),
        "{}: no answers at {at}",
        fixture.display()
    );
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read fixture") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// A `waft node` on `data`, killed on drop.
struct NodeProc(Child, String);

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(data: &Path, addr: &str, log: &Path) -> NodeProc {
    let log = std::fs::File::create(log).expect("log");
    let child = waft()
        .args(["node", "--id", "1", "--listen", addr, "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn waft node");
    NodeProc(child, addr.to_owned())
}

/// `waft --endpoint NODE --output json ARGS`, its output as JSON (None if it is not).
fn json(node: &NodeProc, args: &[&str]) -> (Option<serde_json::Value>, std::process::Output) {
    let o = waft()
        .args(["--endpoint", &node.1, "--output", "json"])
        .args(args)
        .output()
        .expect("run waft");
    (serde_json::from_slice(&o.stdout).ok(), o)
}

/// Waits until `node` leads and has applied what it holds, then checks every answer.
fn check(node: &NodeProc, expected: &Answers, what: &str) {
    let started = Instant::now();
    loop {
        let (status, o) = json(node, &["cluster", "status"]);
        if let Some(s) = status
            && s["role"] == "leader"
            && s["applied_index"] == s["committed_index"]
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: the node never led: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (service, query, want) in &expected.queries {
        let (got, o) = json(node, &["query", "--service", service, query]);
        let mut got = got.unwrap_or_else(|| panic!("{what}: {service} {query}: {o:?}"));
        got.as_object_mut()
            .expect("an object")
            .remove("applied_index");
        assert_eq!(&got, want, "{what}: {service} {query:?}");
    }
    let (services, o) = json(node, &["services"]);
    let services = services.unwrap_or_else(|| panic!("{what}: services: {o:?}"));
    for (service, version) in &expected.versions {
        let s = services
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == service.as_str()))
            .unwrap_or_else(|| panic!("{what}: no service {service}: {services}"));
        assert_eq!(s["version"], *version, "{what}: {service}'s version");
    }
}

/// Seeds a new data directory with `file` (a backup or a snapshot file), offline.
fn seed(file: &Path, data: &Path, addr: &str) {
    let o = waft()
        .arg("restore")
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .args(["--id", "1", "--advertise", addr])
        .output()
        .expect("restore");
    assert!(
        o.status.success(),
        "seeding from {}: {}",
        file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_release_s_fixtures_are_read_and_answer_the_same() {
    let all = fixtures();
    assert!(
        !all.is_empty(),
        "no tests/fixtures/release-*: run scripts/make-fixtures"
    );
    tokio::task::spawn_blocking(move || {
        for fixture in all {
            let name = fixture
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let tmp = tempfile::tempdir().expect("tempdir");
            // The data directory, restarted: its snapshot, then its log after it.
            let data = tmp.path().join("data");
            copy_dir(&fixture.join("data"), &data);
            let node = start(&data, &free_addr(), &tmp.path().join("data.log"));
            check(
                &node,
                &answers(&fixture, "end"),
                &format!("{name}'s data directory"),
            );
            drop(node);
            // The backup and the snapshot file, each seeded into a new data directory.
            for (file, at) in [("backup.waft", "end"), ("snapshot.snap", "snapshot")] {
                let data = tmp.path().join(file);
                let addr = free_addr();
                seed(&fixture.join(file), &data, &addr);
                let node = start(&data, &addr, &tmp.path().join(format!("{file}.log")));
                check(&node, &answers(&fixture, at), &format!("{name}'s {file}"));
            }
        }
    })
    .await
    .expect("join");
}

/// A snapshot or backup of a format this build does not know (a later release's) is refused
/// with the formats named, and the data directory it was to seed stays empty.
#[test]
fn a_fixture_of_an_unknown_format_is_refused_with_the_formats_named() {
    let fixture = fixtures().pop().expect("a release's fixtures");
    let mut bytes = std::fs::read(fixture.join("backup.waft")).expect("backup");
    assert_eq!(&bytes[..7], b"WAFTSNP");
    bytes[7] = b'9';
    // The file's own checksum (its last 32 bytes) made right again: only the format is new.
    let body = bytes.len() - 32;
    let sum = <sha2::Sha256 as sha2::Digest>::digest(&bytes[..body]);
    bytes[body..].copy_from_slice(&sum);
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("future.waft");
    std::fs::write(&file, &bytes).expect("write");
    let data = tmp.path().join("data");
    let o = waft()
        .arg("restore")
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .args(["--id", "1"])
        .output()
        .expect("restore");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("format 9") && err.contains("this build reads formats"),
        "{err}"
    );
    assert!(
        !data.exists() || std::fs::read_dir(&data).expect("dir").next().is_none(),
        "nothing written"
    );
}

/// Every release's recorded node-to-node messages decode as this build reads them: a member of
/// that release and one of this build understand each other. The appends carry commands,
/// deploys by hash and delivered timers.
#[test]
fn every_release_s_node_to_node_messages_decode() {
    for fixture in fixtures() {
        let dir = fixture.join("messages");
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        let mut appended = String::new();
        for e in std::fs::read_dir(&dir).expect("messages/") {
            let path = e.expect("entry").path();
            let name = path
                .file_stem()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let kind = name.rsplit_once('-').expect("KIND-N").0.to_owned();
            let bytes = std::fs::read(&path).expect("read");
            let shown = waft::raft::record::decode(&kind, &bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if kind == "append-request" {
                appended.push_str(&shown);
            }
            *kinds.entry(kind).or_default() += 1;
        }
        for kind in [
            "append-request",
            "append-reply",
            "vote-request",
            "vote-reply",
            "transfer-leader-request",
            "digest-request",
            "digest-reply",
            "hold-module-request",
            "hold-module-reply",
        ] {
            assert!(
                kinds.contains_key(kind),
                "{}: no {kind}: {kinds:?}",
                dir.display()
            );
        }
        for entry in ["Command", "DeployStored", "FireDue", "Audit"] {
            assert!(
                appended.contains(entry),
                "{}: no append carries a {entry} entry",
                dir.display()
            );
        }
    }
}
