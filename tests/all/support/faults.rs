//! A disk that fails under a `waft node` process: `tests/faults/iofault.c`, built here with
//! the system's C compiler (the one cargo links with) and loaded with LD_PRELOAD, makes the
//! node's fsyncs or writes to its data directory fail with EIO, or tears one write in half,
//! while a test says so (see that file for the faults).

use super::procs::ProcCluster;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The fault layer's shared library, built once per test process.
fn library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/faults/iofault.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("libwaft-iofault-{}.so", std::process::id()));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let o = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(&source)
            .arg("-ldl")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cc} (a C compiler, as cargo links with): {e}"));
        assert!(
            o.status.success(),
            "{cc} could not build {}: {}",
            source.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        out
    })
}

/// The faults of one node: armed and cleared while it runs.
pub struct IoFaults {
    control: PathBuf,
}

/// What a failing disk does (see `tests/faults/iofault.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFault {
    /// Every fsync and fdatasync fails with EIO.
    Fsync,
    /// Every write to a file in the data directory fails with EIO.
    Write,
    /// The next write to a file in the data directory writes half and says so; every one
    /// after it fails with EIO.
    Short,
}

impl IoFaults {
    /// Makes the node's disk fail as `fault` says, at once.
    pub fn arm(&self, fault: IoFault) {
        let word = match fault {
            IoFault::Fsync => "fsync",
            IoFault::Write => "write",
            IoFault::Short => "short",
        };
        self.set(word);
    }

    /// The disk works again.
    pub fn clear(&self) {
        self.set("");
    }

    fn set(&self, word: &str) {
        // Written whole and renamed, so the layer never reads half a word.
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, word).expect("fault control file");
        std::fs::rename(&tmp, &self.control).expect("fault control file");
    }
}

impl ProcCluster {
    /// Loads the fault layer into node `i` on every start from now on, aimed at its data
    /// directory, with no fault armed.
    pub fn inject_io_faults(&mut self, i: usize) -> IoFaults {
        let faults = IoFaults {
            control: self.dir.path().join(format!("io-faults-node{}", i + 1)),
        };
        faults.clear();
        let lib = library().to_string_lossy().into_owned();
        // With the slash: `node1.log` beside `node1` is not in it.
        let data = format!("{}/", self.data_dir(i).to_string_lossy());
        let control = faults.control.to_string_lossy().into_owned();
        self.set_node_env(i, "LD_PRELOAD", &lib);
        self.set_node_env(i, "WAFT_FAULT_DIR", &data);
        self.set_node_env(i, "WAFT_FAULT_CONTROL", &control);
        faults
    }
}
