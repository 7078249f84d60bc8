//! The `waft` binary, the one place the tests name it: a command builder, the CLI run off the
//! async runtime, and `waft dev` as a process.

use std::process::{Child, Command, ExitStatus, Output, Stdio};

/// The `waft` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_waft");

/// A command running the `waft` binary.
pub fn waft() -> Command {
    Command::new(BIN)
}

/// Runs `waft ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    waft().args(args).output().expect("run waft")
}

/// Runs the real `waft` binary with `args`, off the async runtime.
pub async fn waft_cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || waft().args(&args).output().expect("run waft"))
        .await
        .expect("join")
}

/// Three consecutive free ports, as `waft dev` numbers its nodes from a base port.
pub fn consecutive_ports() -> u16 {
    loop {
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                super::free_addr()
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("a port")
            })
            .collect();
        if ports[1] == ports[0] + 1 && ports[2] == ports[0] + 2 {
            return ports[0];
        }
    }
}

/// `waft dev` running as a process on free ports, with its data in a temporary directory;
/// killed on drop if not stopped.
pub struct Dev {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The first node's port; node i listens on `base + i - 1`.
    pub base: u16,
    /// What it printed up to its "Press Ctrl-C" line.
    pub banner: String,
}

impl Dev {
    /// Starts `waft dev --base-port BASE --data-dir DIR ARGS` and waits until it has deployed
    /// its guests.
    pub fn start(args: &[&str]) -> Dev {
        use std::io::BufRead;
        let base = consecutive_ports();
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr file");
        let mut child = waft()
            .args(["dev", "--base-port", &base.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn waft dev");
        let stdout = child.stdout.take().expect("stdout");
        let mut banner = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("read");
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        Dev {
            child: Some(child),
            dir,
            base,
            banner,
        }
    }

    /// The address of node `n` (1-based).
    pub fn addr(&self, n: u16) -> String {
        format!("127.0.0.1:{}", self.base + n - 1)
    }

    /// Interrupts it as Ctrl-C would and waits for it to exit; what it wrote to stderr, all
    /// along.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling a child process we own and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait().expect("wait");
        let stderr =
            std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        (status, stderr)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
