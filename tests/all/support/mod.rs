//! Everything the test modules share, one place each:
//! - [`cluster`]: in-process clusters (`TestCluster`), for most tests;
//! - [`procs`]: clusters of `waft node` processes (`ProcCluster`), each peer link through a
//!   [`proxy`] that can stall or cut it, for the binary, the campaigns and operator workflows;
//! - [`bin`]: the `waft` binary (the CLI, `waft dev` as a process);
//! - [`faults`]: a disk that fails (EIO on fsync or write, torn writes) under a node process;
//! - here: tracing, guests in a bare runtime, gRPC channels, free ports, etcd, required tools.

pub mod bin;
pub mod cluster;
pub mod faults;
pub mod procs;
pub mod proxy;

pub use bin::waft_cli;

use waft::runtime::{ApplyCtx, Guest, Runtime, RuntimeConfig};

/// Sends tracing output to the test harness's captured output, once per process.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "info,cranelift=warn,wasmtime=warn",
        ))
        .with_test_writer()
        .try_init();
}

/// A runtime with default limits, or with the given config.
pub fn runtime_with(config: RuntimeConfig) -> Runtime {
    init_tracing();
    Runtime::new(config).expect("runtime builds")
}

/// A runtime with the default configuration.
pub fn runtime() -> Runtime {
    runtime_with(RuntimeConfig::default())
}

/// A fresh instance of the guest at `path`.
pub fn guest(runtime: &Runtime, path: &str) -> Guest {
    let module = runtime
        .load(&waft_testkit::wasm(path))
        .expect("guest loads");
    runtime
        .instantiate(&module, "test")
        .expect("guest instantiates")
}

/// The context of the `n`th entry: index n, term 1, a timestamp that moves with the index.
pub fn ctx(n: u64) -> ApplyCtx {
    ApplyCtx {
        index: n,
        term: 1,
        timestamp_ms: 1_700_000_000_000 + n * 7,
    }
}

/// Applies text commands as entries `first..`, returning each outcome as text.
pub fn apply_all(guest: &mut Guest, first: u64, commands: &[&str]) -> Vec<Result<String, String>> {
    commands
        .iter()
        .zip(first..)
        .map(|(cmd, n)| text(guest.apply(ctx(n), cmd.as_bytes())))
        .collect()
}

/// Applies text commands as entries `first..` in one `apply-batch` call, returning each
/// outcome as text.
pub fn apply_batch_all(
    guest: &mut Guest,
    first: u64,
    commands: &[&str],
) -> Vec<Result<String, String>> {
    let entries: Vec<_> = commands
        .iter()
        .zip(first..)
        .map(|(c, n)| (ctx(n), c.as_bytes()))
        .collect();
    guest.apply_batch(&entries).into_iter().map(text).collect()
}

/// A guest outcome as text, for readable assertions.
pub fn text(result: Result<Vec<u8>, waft::runtime::GuestError>) -> Result<String, String> {
    result
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| e.to_string())
}

/// Queries and returns the answer as text.
pub fn query(guest: &mut Guest, q: &str) -> Result<String, String> {
    text(guest.query(q.as_bytes()))
}

/// A connected gRPC channel to the node at `addr` (host:port).
pub async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// A 127.0.0.1 address with a port that was free a moment ago, for a process that binds it
/// later (and again after a restart).
///
/// The port comes from below the kernel's ephemeral range (32768+ on Linux), never from
/// `bind(0)`: an ephemeral port released by a killed node can be handed to anything else in the
/// meantime (another test's proxy, say), and the node's peers would then talk to a stranger.
/// Ports here are handed out once per test process, so no two nodes of ours ever share one.
pub fn free_addr() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Concurrent test processes start at different offsets.
    let offset = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let port = LOW + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// A single-member etcd (Debian's etcd-server) on fresh ports, stopped and removed on drop.
pub struct Etcd {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    /// Its client address (host:port).
    pub addr: String,
}

impl Etcd {
    /// Starts etcd. A missing etcd fails the test (the test command installs it).
    pub fn start() -> Etcd {
        use std::process::{Command, Stdio};
        require_tool("etcd", &["--version"], "apt-get install etcd-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_addr(), free_addr());
        let child = Command::new("etcd")
            .args(["--name", "solo", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("http://{client}"),
                "--advertise-client-urls",
                &format!("http://{client}"),
                "--listen-peer-urls",
                &format!("http://{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://{peer}"),
                "--initial-cluster",
                &format!("solo=http://{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        Etcd {
            child,
            _dir: dir,
            addr: client,
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails the test, saying what to install, when `program` cannot run: a test whose tool is
/// missing must fail, never pass by skipping (the test command, `scripts/test`, installs every tool).
pub fn require_tool(program: &str, args: &[&str], install: &str) {
    let ran = std::process::Command::new(program).args(args).output();
    assert!(
        ran.is_ok(),
        "{program} is not installed, and this test needs it: run the test command (scripts/test), \
         which installs it, or install it yourself ({install}); {}",
        ran.err().map(|e| e.to_string()).unwrap_or_default()
    );
}
