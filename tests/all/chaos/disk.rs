//! A disk that fills up, for real: a follower's data directory on a small tmpfs, so its writes
//! fail with ENOSPC the way a full disk's do (short writes included), whatever it is writing
//! (its log, a snapshot, a module, compiled code). The `chaos_disk_full` campaign limits file
//! sizes instead (EFBIG); this is the issue-36 case itself: the node must stop alone without
//! acknowledging what it did not persist, the others go on, and once the disk has room again
//! it must start (cutting off the write that failed), catch up and hold every acknowledged
//! write, byte-identical to the others. Each kind of write is made to fail in turn: a
//! snapshot, the log, a deployed module.

use super::determinism::{audit_equal, last_index, submit, wait_applied};
use crate::support::procs::{ProcCluster, connect};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use waft::pb::api::{self, submit_reply::Outcome, waft_client::WaftClient};
use waft_testkit::guests::{EXAMPLE_COUNTER, EXAMPLE_KV};

/// A tmpfs mounted on a directory (unmounted when dropped). Needs root (CAP_SYS_ADMIN), as
/// the suite has on its machines: without it the test fails, saying so.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let size = format!("size={mib}m");
        mount(
            &["-t", "tmpfs", "-o", &size, "tmpfs"],
            path,
            "mount a tmpfs (needs root)",
        );
        Tmpfs(path.to_path_buf())
    }

    /// Gives the file system `kib` KiB in all.
    fn resize(&self, kib: u64) {
        let size = format!("remount,size={kib}k");
        mount(&["-o", &size], &self.0, "resize the tmpfs");
    }

    /// KiB in use.
    fn used_kib(&self) -> u64 {
        let o = Command::new("df")
            .args(["-k", "--output=used"])
            .arg(&self.0)
            .output()
            .expect("run df");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df's figure")
    }
}

/// Runs `mount ARGS PATH`; panics saying it could not `what`.
fn mount(args: &[&str], path: &Path, what: &str) {
    let o = Command::new("mount")
        .args(args)
        .arg(path)
        .output()
        .expect("run mount");
    assert!(
        o.status.success(),
        "cannot {what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The last line in which node `i` said it stopped.
pub(super) fn stop_line(c: &ProcCluster, i: usize) -> String {
    c.log(i)
        .lines()
        .rev()
        .find(|l| l.contains("stopped:"))
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Puts key `k{n}` (n = `acked` + 1) with [`value`] through `nodes`, asserts it was
/// acknowledged, and returns n.
async fn put_next(nodes: &[String], acked: u64) -> u64 {
    let n = acked + 1;
    let put = format!("put k{n} {}", value(n));
    let outcome = submit(nodes, "kv", put.as_bytes(), 0xd15c, n).await;
    assert!(
        matches!(&outcome, Some(Outcome::Ok(r)) if r == b"OK"),
        "put {n}: {outcome:?}"
    );
    n
}

/// A value of about 60 KB, different per key.
fn value(i: u64) -> String {
    format!("{i}-{}", "v".repeat(60_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_whose_disk_fills_stops_alone_and_catches_up_without_loss_once_it_has_room() {
    crate::support::init_tracing();
    let mut c = ProcCluster::unformed(3, &[]).await;
    let victim = 2;
    let disk = Tmpfs::mount(&c.data_dir(victim), 256);
    for i in 0..c.len() {
        c.spawn(i, None);
    }
    c.form().await;
    c.deploy("kv", EXAMPLE_KV).await;
    let (_, index) = last_index(&c).await;
    wait_applied(&c, victim, index).await;
    // What the follower has written so far (its module, compiled code, log), plus 3 MiB.
    let room = disk.used_kib() + 3 * 1024;
    disk.resize(room);
    tracing::info!("node {} has {room} KiB of disk", victim + 1);

    let others: Vec<String> = (0..c.len())
        .filter(|&i| i != victim)
        .map(|i| c.addrs[i].clone())
        .collect();
    let mut acked = 0u64;

    // About 2 MiB of writes, then a snapshot on the follower, which has no room for it: the
    // node stops on the failed write, saying why, and starts again once it has room.
    for _ in 0..33 {
        acked = put_next(&others, acked).await;
    }
    let (_, index) = last_index(&c).await;
    wait_applied(&c, victim, index).await;
    let mut cl = c.cluster_client(victim).await.expect("follower");
    let _ = cl.trigger_snapshot(api::TriggerSnapshotRequest {}).await;
    let stopped = c
        .wait_exited(victim, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| {
            panic!(
                "node {} wrote a snapshot bigger than its disk's room: {}",
                victim + 1,
                c.log_tail(victim, 10)
            )
        });
    assert!(
        !stopped.success(),
        "a node that cannot write must not exit 0"
    );
    assert!(
        c.log(victim).contains("No space left on device"),
        "the node says why it stopped: {}",
        c.log_tail(victim, 20)
    );
    let said = c.log(victim).matches("No space left on device").count();
    eprintln!("after the snapshot: {}", stop_line(&c, victim));
    let room = disk.used_kib() + 3 * 1024;
    disk.resize(room);
    c.spawn(victim, None);
    tracing::info!("node {} restarted with {room} KiB of disk", victim + 1);

    // Writes through the other nodes until the follower stops on its full disk (its log
    // this time); every one of them acknowledged all the same.
    let stopped = loop {
        acked = put_next(&others, acked).await;
        if let Some(status) = c.exited(victim) {
            break status;
        }
        assert!(
            acked < 2000,
            "node {} never ran out of its {room} KiB",
            victim + 1
        );
    };
    assert!(
        !stopped.success(),
        "a node that cannot write must not exit 0"
    );
    assert!(
        c.log(victim).matches("No space left on device").count() > said,
        "the node says why it stopped: {}",
        c.log_tail(victim, 20)
    );
    eprintln!("after the writes: {}", stop_line(&c, victim));
    // The others go on without it.
    for _ in 0..20 {
        acked = put_next(&others, acked).await;
    }

    // Room again: it starts (no "corrupt" refusal), catches up and agrees.
    disk.resize(256 * 1024);
    c.spawn(victim, None);
    let (_, index) = last_index(&c).await;
    wait_applied(&c, victim, index).await;
    assert!(
        c.running(victim) && c.exited(victim).is_none(),
        "node {} stopped again: {}",
        victim + 1,
        c.log_tail(victim, 20)
    );
    audit_equal(&c).await;
    // Every acknowledged write, read from the node that ran out of disk.
    let mut w = WaftClient::new(connect(&c.addrs[victim]).await.expect("connect"));
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 1..=acked {
        let reply = loop {
            let r = w
                .query(api::QueryRequest {
                    service: "kv".into(),
                    payload: format!("get k{i}").into_bytes(),
                    consistency: api::Consistency::Stale as i32,
                })
                .await;
            match r.map(|r| r.into_inner().outcome) {
                Ok(Some(api::query_reply::Outcome::Ok(v))) => break v,
                other => {
                    assert!(Instant::now() < deadline, "get k{i}: {other:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert!(
            reply == value(i).as_bytes(),
            "k{i} on node {}: {} bytes, not the {} acknowledged",
            victim + 1,
            reply.len(),
            value(i).len()
        );
    }

    // A deploy while the follower has no room for the module: the others take it.
    let room = disk.used_kib() + 128;
    disk.resize(room);
    let module = waft_testkit::wasm(EXAMPLE_COUNTER);
    let leader = last_index(&c).await.0;
    let ch =
        crate::support::procs::connect_with_deadline(&c.addrs[leader], Duration::from_secs(120))
            .await
            .expect("leader");
    let r = WaftClient::new(ch)
        .max_encoding_message_size(usize::MAX)
        .deploy(tokio_stream::iter(waft::pb::deploy_chunks(
            "counter", &module, false,
        )))
        .await;
    r.expect("the deploy takes effect on the nodes that have room");
    let stopped = c
        .wait_exited(victim, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("node {} never needed the module's room", victim + 1));
    assert!(
        !stopped.success(),
        "a node that cannot write must not exit 0"
    );
    let said = stop_line(&c, victim);
    eprintln!("after the deploy: {said}");
    assert!(
        said.contains("cannot store module") && said.contains("No space left on device"),
        "the node says which module it could not keep and why: {said}"
    );
    disk.resize(256 * 1024);
    c.spawn(victim, None);
    let (_, index) = last_index(&c).await;
    wait_applied(&c, victim, index).await;
    audit_equal(&c).await;
    let counted = submit(
        &c.addrs[victim..=victim],
        "counter",
        br#"{"add": {"name": "hits", "by": 2}}"#,
        0xc0,
        1,
    )
    .await;
    assert!(
        matches!(&counted, Some(Outcome::Ok(_))),
        "the new service answers through the node that ran out of disk: {counted:?}"
    );
    drop(c);
    drop(disk);
}
