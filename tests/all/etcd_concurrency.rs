//! The etcd endpoint's Watch and Lease, and etcd's concurrency recipes on them (`etcdctl lock`,
//! `etcdctl elect`): one etcdctl session, run against waft and against a real etcd 3.4, prints
//! the same things once lease ids (which each server picks its own way) are blanked.

use crate::etcd::etcdctl;
use crate::support::Etcd;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An etcdctl that keeps running (a watch, a held lock, a campaign), its output collected.
struct Running {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Running {
    fn start(endpoint: &str, args: &[&str]) -> Running {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run etcdctl");
        let out = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().expect("output");
                s.push_str(&line);
                s.push('\n');
            }
        });
        Running { child, out }
    }

    fn output(&self) -> String {
        self.out.lock().expect("output").clone()
    }

    /// Waits until the output has `lines` lines (20 s at most).
    async fn wait_lines(&self, lines: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.output();
            if out.lines().count() >= lines {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "etcdctl printed only {out:?}, waiting for {lines} lines"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Interrupts it (as Ctrl-C: a lock or campaign is released) and waits for it to end.
    async fn interrupt(mut self) -> String {
        // SAFETY: signalling a child process this test started and still owns.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "etcdctl did not stop on SIGINT");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.output()
    }

    /// Waits for it to end by itself (20 s at most).
    async fn finish(mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return (status.success(), self.output());
            }
            assert!(
                Instant::now() < deadline,
                "etcdctl did not finish: {:?}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lease id in etcdctl's "lease ID granted with TTL(Ns)".
fn lease_id(out: &str) -> String {
    out.split_whitespace().nth(1).expect("lease id").to_owned()
}

/// The lease id in the key etcdctl's lock and elect print first ("NAME/LEASE").
fn key_lease(out: &str) -> String {
    let key = out.lines().next().expect("a key");
    key.rsplit('/').next().expect("a lease").to_owned()
}

/// Blanks `ids` (hex, as etcdctl prints them, and decimal, as its JSON does) and the seconds a
/// lease has left (both servers count down on their own clocks).
fn blank(out: &str, ids: &[String]) -> String {
    let mut text = crate::etcd::normalize(out);
    for (n, id) in ids.iter().enumerate() {
        let decimal = i64::from_str_radix(id, 16).expect("hex id").to_string();
        text = text.replace(id.as_str(), &format!("<lease{n}>"));
        text = text.replace(&decimal, &format!("<lease{n}>"));
    }
    while let Some(at) = text.find("remaining(") {
        let end = at + text[at..].find(')').expect("closing parenthesis");
        text.replace_range(at..=end, "remaining<s>");
    }
    // etcd lists a lease's keys in the order of a Go map, which differs from run to run.
    let mut from = 0;
    while let Some(at) = text[from..].find("attached keys([") {
        let start = from + at + "attached keys([".len();
        let end = start + text[start..].find("])").expect("closing bracket");
        let mut keys: Vec<&str> = text[start..end].split(' ').collect();
        keys.sort_unstable();
        let sorted = keys.join(" ");
        text.replace_range(start..end, &sorted);
        from = end;
    }
    text
}

/// One etcdctl session of leases, watches, a lock and an election; what it printed, step by
/// step, with lease ids blanked.
async fn session(endpoint: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut step = |ids: &Vec<String>, what: &str, ok: bool, text: &str| {
        out.push(blank(&format!("{what} ok={ok}\n{text}"), ids));
    };
    let run = |args: &'static [&'static str]| async move { etcdctl(endpoint, args, None).await };

    // A watch from revision 1 sees everything below, each change once, in order.
    let watch = Running::start(
        endpoint,
        &["watch", "--prefix", "k", "--rev=1", "--prev-kv"],
    );

    // Leases: grant, attach, look, keep alive, revoke (its keys go).
    let (ok, text, _) = run(&["lease", "grant", "60"]).await;
    ids.push(lease_id(&text));
    step(&ids, "grant", ok, &text);
    let lease = ids[0].clone();
    for args in [
        vec!["put", "k1", "v1", "--lease", &lease],
        vec!["put", "k2", "v2"],
        vec!["put", "k3", "v3", "--lease", &lease],
        vec!["get", "k", "--prefix", "-w", "json"],
        vec!["lease", "timetolive", &lease, "--keys"],
        vec!["lease", "list"],
        vec!["lease", "keep-alive", "--once", &lease],
        vec!["put", "k3", "v3b"],
        vec!["lease", "timetolive", &lease, "--keys"],
        vec!["lease", "revoke", &lease],
        vec!["get", "k", "--prefix"],
        vec!["lease", "timetolive", &lease],
        vec!["lease", "revoke", &lease],
        vec!["lease", "keep-alive", "--once", &lease],
        vec!["put", "k9", "x", "--lease", &lease],
    ] {
        let (ok, text, err) = etcdctl(endpoint, &args, None).await;
        let said = format!("{text}{}", err.lines().last().unwrap_or(""));
        step(&ids, &args.join(" "), ok, &said);
    }

    // A short lease runs out by itself: its key is deleted by the server.
    let (ok, text, _) = run(&["lease", "grant", "2"]).await;
    ids.push(lease_id(&text));
    step(&ids, "grant 2", ok, &text);
    let short = ids[1].clone();
    let (ok, text, _) = etcdctl(endpoint, &["put", "k5", "short", "--lease", &short], None).await;
    step(&ids, "put k5", ok, &text);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, text, _) = run(&["get", "k5"]).await;
        if text.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the 2 s lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, text, _) = etcdctl(endpoint, &["lease", "timetolive", &short], None).await;
    step(&ids, "expired", ok, &text);

    // Every change the watch saw: puts, the revoke's deletes, the expiry's delete.
    let seen = watch.wait_lines(27).await;
    step(&ids, "watch", true, &seen);
    drop(watch);

    // A lock: the second holder waits for the first to let go.
    let first = Running::start(endpoint, &["lock", "L"]);
    let held = first.wait_lines(1).await;
    ids.push(key_lease(&held));
    step(&ids, "lock held", true, &held);
    let second = Running::start(endpoint, &["lock", "L", "echo", "second holder"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    step(&ids, "second waits", true, &second.output());
    first.interrupt().await;
    let (ok, text) = second.finish().await;
    step(&ids, "second got it", ok, &text);

    // An election: a leader, an observer that sees it, then the next leader when it resigns.
    let leader = Running::start(endpoint, &["elect", "E", "alpha"]);
    let said = leader.wait_lines(2).await;
    ids.push(key_lease(&said));
    step(&ids, "elected", true, &said);
    let observer = Running::start(endpoint, &["elect", "-l", "E"]);
    let seen = observer.wait_lines(2).await;
    step(&ids, "observed", true, &seen);
    let next = Running::start(endpoint, &["elect", "E", "beta"]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    step(&ids, "beta waits", true, &next.output());
    leader.interrupt().await;
    let said = next.wait_lines(2).await;
    ids.push(key_lease(&said));
    step(&ids, "beta elected", true, &said);
    let seen = observer.wait_lines(4).await;
    step(&ids, "observer saw beta", true, &seen);
    next.interrupt().await;
    drop(observer);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_watch_lease_lock_and_elect_match_a_real_etcd() {
    crate::support::require_tool("etcdctl", &["version"], "apt-get install etcd-client");
    let real = Etcd::start();
    // Through a follower: every call is forwarded, watches are served from its own history.
    let (cluster, endpoint) = crate::etcd::etcd_cluster().await;
    crate::etcd::wait_healthy(&real.addr).await;
    let theirs = session(&real.addr).await;
    let ours = session(&endpoint).await;
    tracing::info!("the session against waft:\n{}", ours.join("\n"));
    let differ: Vec<String> = theirs
        .iter()
        .zip(&ours)
        .filter(|(t, o)| t != o)
        .map(|(t, o)| format!("etcd:\n{t}\nwaft:\n{o}"))
        .collect();
    assert!(
        differ.is_empty(),
        "etcd and waft differ:\n{}",
        differ.join("\n----\n")
    );
    assert_eq!(theirs.len(), ours.len());
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

/// The first two responses of a watch of `key` from `start` on the etcd at `endpoint`, and the
/// events that follow within a second.
async fn watch_from(endpoint: &str, key: &[u8], start: i64) -> Vec<waft::pb::etcd::WatchResponse> {
    use waft::pb::etcd::{self as pb, watch_client::WatchClient};
    let mut client = WatchClient::connect(format!("http://{endpoint}"))
        .await
        .expect("connect");
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.to_vec(),
                start_revision: start,
                ..Default::default()
            },
        )),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create).await.expect("send");
    let mut stream = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(1), stream.message()).await
    {
        out.push(r);
    }
    drop(tx);
    out
}

/// A watch that starts before what the node it asks still holds (its event history starts at
/// its last snapshot install or start), or before a compaction, is created and then cancelled
/// with the oldest revision it could have, as etcd cancels one below its compaction point; from
/// that revision on it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_from_before_what_a_node_holds_is_cancelled_as_compacted() {
    crate::support::require_tool("etcdctl", &["version"], "apt-get install etcd-client");
    let (mut cluster, leader, f) = crate::etcd::etcd_nodes().await;
    let at = |c: &crate::support::cluster::TestCluster| crate::etcd::etcd_endpoint(c, f);
    for v in ["1", "2", "3"] {
        assert!(etcdctl(&at(&cluster), &["put", "k", v], None).await.0); // revisions 2, 3, 4
    }
    // The follower snapshots everything and restarts from its snapshot.
    let last = cluster.node(leader).metrics().last_log_index.expect("log");
    cluster.wait_applied(last).await;
    let node = cluster.node(f);
    node.raft().trigger().snapshot().await.expect("snapshot");
    node.raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot built",
        )
        .await
        .expect("snapshot built");
    cluster.stop(f).await;
    cluster.restart(f).await;
    assert!(etcdctl(&at(&cluster), &["put", "k", "4"], None).await.0); // revision 5
    let last = cluster.node(leader).metrics().last_log_index.expect("log");
    cluster.wait_applied(last).await;

    // No key: created and cancelled with etcd's words.
    let empty = watch_from(&at(&cluster), b"", 0).await;
    assert!(
        empty.len() == 1 && empty[0].created && empty[0].canceled,
        "{empty:?}"
    );
    assert_eq!(empty[0].cancel_reason, "etcdserver: key is not provided");

    let old = watch_from(&at(&cluster), b"k", 2).await;
    assert!(old.len() >= 2, "{old:?}");
    assert!(old[0].created && !old[0].canceled, "{old:?}");
    assert!(old[1].canceled, "{old:?}");
    assert_eq!(old[1].compact_revision, 5, "{old:?}");
    assert!(old[1].cancel_reason.contains("compacted"), "{old:?}");
    // From the revision it was told, the watch works.
    let from = watch_from(&at(&cluster), b"k", 5).await;
    let values: Vec<Vec<u8>> = from
        .iter()
        .flat_map(|r| &r.events)
        .filter_map(|e| e.kv.as_ref().map(|kv| kv.value.clone()))
        .collect();
    assert_eq!(values, [b"4".to_vec()], "{from:?}");

    // A compaction moves the oldest start for every member, the leader included.
    assert!(etcdctl(&at(&cluster), &["put", "k", "5"], None).await.0); // revision 6
    let (ok, _, err) = etcdctl(&at(&cluster), &["compact", "6"], None).await;
    assert!(ok, "{err}");
    let (ok, _, err) = etcdctl(&at(&cluster), &["compact", "6"], None).await;
    assert!(
        !ok && err.contains("required revision has been compacted"),
        "{err}"
    );
    let on_leader = crate::etcd::etcd_endpoint(&cluster, leader);
    let compacted = watch_from(&on_leader, b"k", 5).await;
    assert!(
        compacted.len() >= 2 && compacted[1].canceled,
        "{compacted:?}"
    );
    assert_eq!(compacted[1].compact_revision, 6, "{compacted:?}");
    cluster.assert_identical().await;
    cluster.shutdown().await;
}
