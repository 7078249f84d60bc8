//! Progress of long work, as a person at a terminal sees it: `waft deploy` run with its
//! standard error on a pseudo-terminal says which members compile the module, when each is
//! done, the leader's check and the proposal; with JSON output or off a terminal it draws
//! nothing. `waft cluster transfer-leader` waits until the new leader leads.

use crate::support::bin::waft;
use crate::support::procs::ProcCluster;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use waft_testkit::guests::EXAMPLE_KV;

/// Runs `cmd` with its standard error on a new pseudo-terminal (100 columns); its standard
/// output, status and what the terminal showed, escape sequences removed.
fn on_a_terminal(mut cmd: Command) -> (Output, String) {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the integers given; no name or termios.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned here alone.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    };
    cmd.env("TERM", "xterm")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave));
    let child = cmd.spawn().expect("spawn waft");
    // The child holds the terminal's other end now; ours closes with the command, so reading
    // ends (EIO) when the child exits.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut shown = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            shown.extend_from_slice(&buf[..n]);
        }
        shown
    });
    let out = child.wait_with_output().expect("wait");
    let shown = reader.join().expect("reader");
    (out, plain(&String::from_utf8_lossy(&shown)))
}

/// `text` without terminal escape sequences (CSI: ESC [ ... final byte).
fn plain(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn leader_of(addr: &str) -> u64 {
    let o = waft()
        .args(["--endpoint", addr, "--output", "json", "cluster", "status"])
        .output()
        .expect("status");
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    s["leader_id"].as_u64().expect("a leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_on_a_terminal_shows_each_members_compile() {
    let c = ProcCluster::start(3, &[]).await;
    let addrs = c.addrs.clone();
    tokio::task::spawn_blocking(move || {
        let leader = leader_of(&addrs[0]);
        let deploy = |output: &str, service: &str| {
            let mut cmd = waft();
            // Given a follower; the client goes on to the leader it names.
            let follower = &addrs[leader as usize % 3];
            cmd.args([
                "--endpoint",
                follower,
                "--output",
                output,
                "deploy",
                EXAMPLE_KV,
            ])
            .args(["--service", service]);
            on_a_terminal(cmd)
        };
        let (out, shown) = deploy("text", "kv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{shown}");
        assert!(stdout.contains("deployed"), "{stdout}");
        assert!(
            shown.contains(&format!("node {leader} (the leader) has the module")),
            "{shown}"
        );
        let members: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
        assert!(
            shown.contains(&format!(
                "nodes {}, {} fetch and compile it (1 of them must hold it, with the leader)",
                members[0], members[1]
            )),
            "{shown}"
        );
        for m in &members {
            assert!(
                shown.contains(&format!("node {m} compiled it in ")),
                "node {m}: {shown}"
            );
        }
        assert!(
            shown.contains(&format!(
                "node {leader} (the leader) compiled and checked it in "
            )),
            "{shown}"
        );
        assert!(
            shown.contains("proposed: waiting for it to be committed and applied"),
            "{shown}"
        );
        // JSON output on a terminal: only the JSON, on standard output.
        let (out, shown) = deploy("json", "kv2");
        assert!(out.status.success(), "{shown}");
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(reply["version"], 1);
        assert!(!shown.contains("compiled"), "{shown}");
        // A rollback on a terminal: the version's check, each member's compile, the proposal.
        let o = waft()
            .args([
                "--endpoint",
                &addrs[0],
                "deploy",
                EXAMPLE_KV,
                "--service",
                "kv",
            ])
            .args(["--fuel", "50000000"])
            .output()
            .expect("deploy version 2");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut cmd = waft();
        cmd.args(["--endpoint", &addrs[0], "rollback", "--service", "kv"]);
        let (out, shown) = on_a_terminal(cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{shown}");
        assert!(stdout.contains("as version 3"), "{stdout}");
        assert!(
            shown.contains(&format!(
                "node {leader} (the leader) compiled and checked it in "
            )),
            "{shown}"
        );
        for m in &members {
            assert!(
                shown.contains(&format!("node {m} compiled it in ")),
                "{shown}"
            );
        }
        assert!(shown.contains("proposed: waiting"), "{shown}");
    })
    .await
    .expect("join");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_leader_waits_until_the_new_leader_leads() {
    let mut c = ProcCluster::start(3, &[]).await;
    let addrs = c.addrs.clone();
    tokio::task::spawn_blocking(move || {
        let leader = leader_of(&addrs[0]);
        let to = leader % 3 + 1;
        let o = waft()
            .args(["--endpoint", &addrs[0], "cluster", "transfer-leader"])
            .arg(to.to_string())
            .output()
            .expect("transfer");
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            stdout.starts_with(&format!("node {to} leads (term ")),
            "{stdout}"
        );
        // When it returns, the node asked already sees the new leader.
        assert_eq!(leader_of(&addrs[0]), to);
        builds_are_named(&addrs);
        // A member that is down: named as not answering, the others still shown.
        let down = if to == 2 { 2 } else { 1 };
        c.kill(down);
        let o = waft()
            .args(["--endpoint", &addrs[0], "cluster", "status"])
            .output()
            .expect("status");
        let text = String::from_utf8_lossy(&o.stdout);
        let row = |id: usize| {
            text.lines()
                .find(|l| l.trim_start().starts_with(&format!("{id} ")))
                .unwrap_or_else(|| panic!("no row for node {id}: {text}"))
                .to_owned()
        };
        assert!(row(down + 1).ends_with("(did not answer)"), "{text}");
        assert!(row(1).contains(" (commit "), "{text}");
        // A voter that does not exist: refused, in words.
        let o = waft()
            .args(["--endpoint", &addrs[0], "cluster", "transfer-leader", "9"])
            .output()
            .expect("transfer");
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("node 9 is not a voter"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    })
    .await
    .expect("join");
}

/// `Waft.DeployWatched` called on a follower, as a client without leader following would: the
/// follower relays it to the leader and the leader's steps come back through it, the reply
/// last. A module that is not a guest ends the stream with the error `Deploy` answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_relays_a_watched_deploy_and_its_steps() {
    use waft::pb::api::{deploy_progress::Kind, deploy_step::Kind as Step};
    let cluster =
        crate::support::cluster::TestCluster::start(3, crate::support::cluster::test_settings())
            .await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    let mut c = waft::pb::api::waft_client::WaftClient::connect(format!(
        "http://{}",
        cluster.addrs[follower]
    ))
    .await
    .expect("connect")
    .max_decoding_message_size(usize::MAX)
    .max_encoding_message_size(usize::MAX);
    let module = waft_testkit::wasm(EXAMPLE_KV);
    let chunks = waft::pb::deploy_chunks("kv", &module, false);
    let mut stream = c
        .deploy_watched(futures::stream::iter(chunks))
        .await
        .expect("deploy_watched")
        .into_inner();
    let (mut steps, mut done) = (Vec::new(), None);
    while let Some(m) = stream.message().await.expect("a step") {
        match m.kind.expect("a kind") {
            Kind::Step(s) => steps.push((s.kind(), s.node)),
            Kind::Done(reply) => done = Some(reply),
        }
    }
    let done = done.expect("the reply comes last");
    assert_eq!(done.version, 1);
    let leader_id = cluster.node(leader).id();
    assert_eq!(
        steps.first(),
        Some(&(Step::Received, leader_id)),
        "{steps:?}"
    );
    assert_eq!(
        steps.last(),
        Some(&(Step::Proposed, leader_id)),
        "{steps:?}"
    );
    assert!(steps.contains(&(Step::Checked, leader_id)), "{steps:?}");
    for n in cluster.nodes.iter().flatten().map(|n| n.id()) {
        if n != leader_id {
            assert!(steps.contains(&(Step::MemberReady, n)), "{n}: {steps:?}");
        }
    }
    // Not a guest: the stream ends with INVALID_ARGUMENT, saying so.
    let chunks = waft::pb::deploy_chunks("bad", b"not wasm at all", false);
    let outcome = match c.deploy_watched(futures::stream::iter(chunks)).await {
        Err(status) => status,
        Ok(r) => {
            let mut stream = r.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => break status,
                    Ok(Some(m)) => assert!(
                        !matches!(m.kind, Some(Kind::Done(_))),
                        "a bad module deployed"
                    ),
                    Ok(None) => panic!("the stream ended without the error"),
                }
            }
        }
    };
    assert_eq!(outcome.code(), tonic::Code::InvalidArgument, "{outcome:?}");
    cluster.shutdown().await;
}

/// `waft --version` names the release and the commit; `waft cluster status` names every
/// member's build, asked of each, and says which did not answer.
fn builds_are_named(addrs: &[String]) {
    let o = waft().arg("--version").output().expect("--version");
    let version = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let build = version
        .strip_prefix("waft ")
        .expect("waft VERSION (commit C)");
    assert!(
        build.starts_with(env!("CARGO_PKG_VERSION")) && build.contains(" (commit "),
        "{version}"
    );
    assert!(
        !build.contains("unknown"),
        "a checkout names its commit: {version}"
    );
    let o = waft()
        .args([
            "--endpoint",
            &addrs[0],
            "--output",
            "json",
            "cluster",
            "status",
        ])
        .output()
        .expect("status");
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert_eq!(
        format!(
            "{} (commit {})",
            s["version"].as_str().unwrap_or(""),
            s["commit"].as_str().unwrap_or("")
        ),
        build
    );
    let members = s["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    for m in members {
        assert_eq!(m["version"], build, "{m}");
    }
}
