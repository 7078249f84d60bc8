//! A cluster of real `waft node` processes on loopback, each peer link through its own proxy
//! (see [`super::proxy`]), with the faults a harness needs: SIGKILL and restart, SIGSTOP and
//! SIGCONT, a file-size limit that makes writes fail like a full disk, wall clocks set ahead,
//! behind or jumping (Debian's libfaketime, [`ProcCluster::skew_clocks`]), and partitions. The
//! chaos campaigns use it formed ([`ProcCluster::start`]); the operator-workflow tests start
//! it empty ([`ProcCluster::unformed`]) and form it through the CLI.

use super::proxy::Network;
use crate::support::free_addr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;
use tempfile::TempDir;
use tonic::transport::Channel;
use waft::pb::api::{self, cluster_client::ClusterClient};

pub struct ProcCluster {
    pub dir: TempDir,
    pub addrs: Vec<String>,
    pub net: Network,
    children: Vec<Option<Child>>,
    paused: Vec<bool>,
    node_args: Vec<String>,
    env: Vec<(String, String)>,
    /// Per node: arguments and environment of its own (added to the shared ones).
    own: Vec<OwnSettings>,
    /// Per node: another `waft` binary to run (a previous release, for upgrade campaigns).
    bins: Vec<Option<PathBuf>>,
}

/// A node's own arguments and environment variables.
type OwnSettings = (Vec<String>, Vec<(String, String)>);

/// Debian's libfaketime (package `libfaketime`, installed by `scripts/test`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A gRPC channel to `addr` that fails fast when the node is down.
pub async fn connect(addr: &str) -> Option<Channel> {
    connect_with_deadline(addr, Duration::from_secs(3)).await
}

/// [`connect`] with another deadline for each call on the channel (a deploy that compiles a
/// module on every node needs far more than 3 s on a loaded machine).
pub async fn connect_with_deadline(addr: &str, deadline: Duration) -> Option<Channel> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(deadline)
        .tcp_nodelay(true)
        .connect()
        .await
        .ok()
}

fn signal(child: &Child, sig: i32) {
    let pid = child.id() as i32;
    // SAFETY: sends a signal to a child process we own and have not reaped.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

impl ProcCluster {
    /// Starts `n` node processes (ids 1..=n) with `node_args` added to each, forms a cluster of
    /// `n` voters and returns once every node is a voter.
    pub async fn start(n: usize, node_args: &[&str]) -> ProcCluster {
        let mut c = ProcCluster::unformed(n, node_args).await;
        for i in 0..n {
            c.spawn(i, None);
        }
        c.form().await;
        c
    }

    /// Addresses, proxies and a data directory for `n` nodes, none started.
    pub async fn unformed(n: usize, node_args: &[&str]) -> ProcCluster {
        let addrs: Vec<String> = (0..n).map(|_| free_addr()).collect();
        let net = Network::start(&addrs).await;
        ProcCluster {
            dir: tempfile::tempdir().expect("tempdir"),
            addrs,
            net,
            children: (0..n).map(|_| None).collect(),
            paused: vec![false; n],
            node_args: node_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            own: (0..n).map(|_| Default::default()).collect(),
            bins: vec![None; n],
        }
    }

    /// Adds arguments for node `i` on every start from now on.
    pub fn add_node_args(&mut self, i: usize, args: &[&str]) {
        self.own[i].0.extend(args.iter().map(|a| a.to_string()));
    }

    /// Runs node `i` from binary `bin` (`None`: the one cargo built) on every start from now
    /// on: a node "upgraded" or "downgraded" by swapping its binary.
    pub fn set_node_bin(&mut self, i: usize, bin: Option<PathBuf>) {
        self.bins[i] = bin;
    }

    /// Replaces node `i`'s own arguments for every start from now on (a node "upgraded" to
    /// another build, played with the hidden `--cluster-versions`).
    pub fn set_node_args(&mut self, i: usize, args: &[&str]) {
        self.own[i].0 = args.iter().map(|a| a.to_string()).collect();
    }

    /// Gives every node started from now on a wall clock of its own that
    /// [`ProcCluster::set_clock`] moves while it runs (libfaketime, its offset re-read every
    /// second). Monotonic clocks stay true, as they do when NTP steps a real machine's clock.
    /// Panics, saying what to install, when libfaketime is missing: the test must not pass
    /// without it.
    pub fn skew_clocks(&mut self) {
        assert!(
            std::path::Path::new(LIBFAKETIME).exists(),
            "{LIBFAKETIME} is missing: install Debian's faketime (scripts/test does)"
        );
        for i in 0..self.len() {
            let file = self.clock_file(i);
            std::fs::write(&file, "+0\n").expect("clock file");
            let env = &mut self.own[i].1;
            env.push(("LD_PRELOAD".into(), LIBFAKETIME.into()));
            env.push((
                "FAKETIME_TIMESTAMP_FILE".into(),
                file.to_string_lossy().into_owned(),
            ));
            env.push(("FAKETIME_CACHE_DURATION".into(), "1".into()));
            env.push(("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()));
        }
    }

    /// Sets node `i`'s wall clock `offset_secs` from the true time (see
    /// [`ProcCluster::skew_clocks`]); it takes effect within a second.
    pub fn set_clock(&self, i: usize, offset_secs: i64) {
        // libfaketime's relative form: "+N" or "-N" seconds.
        let line = format!("{offset_secs:+}\n");
        let file = self.clock_file(i);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, line).expect("clock file");
        std::fs::rename(&tmp, &file).expect("clock file");
    }

    fn clock_file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("clock-node{}", i + 1))
    }

    /// Sets an environment variable for node `i` on every start from now on.
    pub fn set_node_env(&mut self, i: usize, key: &str, value: &str) {
        self.own[i].1.push((key.to_owned(), value.to_owned()));
    }

    /// Sets an environment variable for every node started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Node `i`'s whole log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{}.log", i + 1)))
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}", i + 1))
    }

    /// Starts node `i` (again) on its address with its data directory. With `max_file_bytes`,
    /// the process may not grow any file past that size: writes beyond it fail with EFBIG, the
    /// way they would on a full disk.
    pub fn spawn(&mut self, i: usize, max_file_bytes: Option<u64>) {
        self.spawn_with(i, max_file_bytes, &[]);
    }

    /// Like [`ProcCluster::spawn`], with `extra` arguments for this start only.
    pub fn spawn_with(&mut self, i: usize, max_file_bytes: Option<u64>, extra: &[&str]) {
        assert!(self.children[i].is_none(), "node {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{}.log", i + 1)))
            .expect("log file");
        let mut cmd = match &self.bins[i] {
            Some(bin) => std::process::Command::new(bin),
            None => super::bin::waft(),
        };
        cmd.envs(self.env.iter().chain(&self.own[i].1).map(|(k, v)| (k, v)))
            .args(["--log", "info,cranelift=warn,wasmtime=warn", "node", "--id"])
            .arg((i + 1).to_string())
            .args(["--listen", &self.addrs[i], "--data-dir"])
            .arg(self.data_dir(i))
            .args(&self.node_args)
            .args(&self.own[i].0)
            .args(extra)
            .args(self.net.dial_args(i, &self.addrs))
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(limit) = max_file_bytes {
            // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // Without this, exceeding the limit kills the process with SIGXFSZ instead
                    // of failing the write.
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.children[i] = Some(cmd.spawn().expect("spawn waft node"));
        self.paused[i] = false;
    }

    /// SIGTERM, as an operator stops a node, and waits (up to `within`, then SIGKILL) until it
    /// exits.
    pub async fn terminate(&mut self, i: usize, within: Duration) {
        let Some(child) = self.children[i].as_ref() else {
            return;
        };
        signal(child, libc::SIGTERM);
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.children[i]
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                self.children[i] = None;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill(i);
    }

    /// SIGKILL: the process dies mid-whatever, without flushing anything.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused[i] = false;
    }

    /// SIGSTOP: the process freezes (its sockets stay open; peers see silence).
    pub fn pause(&mut self, i: usize) {
        if let Some(c) = &self.children[i] {
            signal(c, libc::SIGSTOP);
            self.paused[i] = true;
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self, i: usize) {
        if let Some(c) = &self.children[i] {
            signal(c, libc::SIGCONT);
            self.paused[i] = false;
        }
    }

    pub fn running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    pub fn paused(&self, i: usize) -> bool {
        self.paused[i]
    }

    /// `Some(status)` if node `i`'s process has exited on its own.
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let status = self.children[i].as_mut()?.try_wait().ok()??;
        self.children[i] = None;
        Some(status)
    }

    /// Three nodes with `kv` (a guest's path) deployed as `kv`, then one follower killed:
    /// the cluster, the leader and the stopped follower.
    pub async fn kv_with_a_follower_stopped(kv: &str) -> (ProcCluster, usize, usize) {
        let mut c = ProcCluster::start(3, &[]).await;
        c.deploy("kv", kv).await;
        let l = c
            .wait_leader(Duration::from_secs(20))
            .await
            .expect("a leader");
        let f = (l + 1) % 3;
        c.kill(f);
        (c, l, f)
    }

    /// Waits (up to `within`) for node `i`'s process to end by itself; how it ended.
    pub async fn wait_exited(
        &mut self,
        i: usize,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.exited(i) {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// The bytes of node `i`'s WAL file that hold records (not the zeros written ahead).
    pub fn wal_records(&self, i: usize) -> u64 {
        std::fs::read(self.data_dir(i).join("log.wal"))
            .map_or(0, |b| b.iter().rposition(|x| *x != 0).map_or(0, |i| i + 1)) as u64
    }

    /// The tail of node `i`'s log, for messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = self.log(i);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub async fn cluster_client(&self, i: usize) -> Option<ClusterClient<Channel>> {
        if !self.running(i) || self.paused(i) {
            return None;
        }
        connect(&self.addrs[i]).await.map(ClusterClient::new)
    }

    pub async fn status(&self, i: usize) -> Option<api::StatusReply> {
        let mut c = self.cluster_client(i).await?;
        c.status(api::StatusRequest::default())
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// The node that is leader in its own view, with the highest term among those.
    pub async fn leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for i in 0..self.len() {
            if let Some(s) = self.status(i).await
                && s.role == "leader"
                && best.is_none_or(|(t, _)| s.term > t)
            {
                best = Some((s.term, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// Polls until a leader is known or `within` passes.
    pub async fn wait_leader(&self, within: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(l) = self.leader().await {
                return Some(l);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    pub async fn form(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut c = loop {
            if let Some(c) = self.cluster_client(0).await {
                break c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node 1 never answered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        c.init(api::InitRequest { members: vec![] })
            .await
            .expect("init");
        for i in 1..self.len() {
            let req = api::AddLearnerRequest {
                id: i as u64 + 1,
                addr: self.addrs[i].clone(),
            };
            retry(|| {
                let mut c = c.clone();
                let req = req.clone();
                async move { c.add_learner(req).await }
            })
            .await;
        }
        let req = api::ChangeMembershipRequest {
            voters: (1..=self.len() as u64).collect(),
            retain: false,
            add_voters: vec![],
        };
        retry(|| {
            let mut c = c.clone();
            let req = req.clone();
            async move { c.change_membership(req).await }
        })
        .await;
    }

    /// Deploys the module at `path` as `service` through any node that answers.
    pub async fn deploy(&self, service: &str, path: &str) {
        let module = waft_testkit::wasm(path);
        for _ in 0..100 {
            for addr in &self.addrs {
                let Some(ch) = connect(addr).await else {
                    continue;
                };
                let mut w = waft::pb::api::waft_client::WaftClient::new(ch)
                    .max_encoding_message_size(usize::MAX);
                let chunks = waft::pb::deploy_chunks(service, &module, false);
                if w.deploy(tokio_stream::iter(chunks)).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("deploy of {service} never succeeded");
    }
}

/// Retries an admin call that may race an election or a membership change.
async fn retry<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..100 {
        match call().await {
            Ok(r) => return r.into_inner(),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("admin call kept failing: {last:?}");
}
