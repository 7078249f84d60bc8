//! What the two log engines (the WAL, redb) share: which engine a data directory holds, and
//! the deploy hook both call on append.

use crate::types::Entry;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a node stores its Raft log. A data directory keeps the engine it was created with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogEngine {
    /// A redb database (`log.redb`): one B-tree commit per batch of writes.
    Redb,
    /// An append-only file (`log.wal`, see [`crate::storage::wal`]): one write and one
    /// `fdatasync` per batch. The default for new data directories: about a quarter more
    /// writes per second than redb on the same machine (docs/benchmarks.md).
    #[default]
    Wal,
}

impl LogEngine {
    /// The log's file in `dir`.
    pub fn path(self, dir: &Path) -> PathBuf {
        match self {
            LogEngine::Redb => dir.join("log.redb"),
            LogEngine::Wal => dir.join("log.wal"),
        }
    }

    /// The engine of the log `dir` holds, if any; an error if it holds both.
    pub fn found_in(dir: &Path) -> std::io::Result<Option<LogEngine>> {
        let (redb, wal) = (LogEngine::Redb.path(dir), LogEngine::Wal.path(dir));
        match (redb.exists(), wal.exists()) {
            (true, true) => Err(std::io::Error::other(format!(
                "{} holds a log in both engines ({} and {}); move the one that is not this \
                 node's away",
                dir.display(),
                redb.display(),
                wal.display()
            ))),
            (true, false) => Ok(Some(LogEngine::Redb)),
            (false, true) => Ok(Some(LogEngine::Wal)),
            (false, false) => Ok(None),
        }
    }

    /// The engine to open `dir` with: the one asked for, which must be the one the directory
    /// holds if it holds a log; without a wish, the directory's, or the default for a new one.
    pub fn resolve(wanted: Option<LogEngine>, dir: &Path) -> std::io::Result<LogEngine> {
        match (wanted, LogEngine::found_in(dir)?) {
            (Some(w), Some(found)) if w != found => Err(std::io::Error::other(format!(
                "{} holds a log in the other engine ({}); start with the engine it was made \
                 with (--log-engine {}), or leave the option out",
                dir.display(),
                found.path(dir).display(),
                found.name()
            ))),
            (Some(w), _) => Ok(w),
            (None, Some(found)) => Ok(found),
            (None, None) => Ok(LogEngine::default()),
        }
    }

    /// The engine's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LogEngine::Redb => "redb",
            LogEngine::Wal => "wal",
        }
    }
}

/// The module of a deploy entry: its bytes (entries written by earlier releases) or its hash.
#[derive(Debug, Clone, Copy)]
pub enum DeployedModule<'a> {
    /// The component's bytes, inline in the entry.
    Inline(&'a [u8]),
    /// The sha256 (hex) of a module in the module store.
    Stored(&'a str),
}

/// Called with the module of every deploy entry as it is appended, before it commits: the node
/// compiles the module in the background, so that applying the deploy (the swap itself) finds
/// it compiled.
pub type DeployHook = Arc<dyn Fn(DeployedModule<'_>) + Send + Sync>;

/// Calls `hook` with the module when `entry` is a deploy (both log engines do on append).
pub(crate) fn notify_deploy(hook: Option<&DeployHook>, entry: &Entry) {
    use crate::types::Request;
    let Some(hook) = hook else { return };
    match &entry.payload {
        openraft::EntryPayload::Normal(
            Request::Deploy { module, .. } | Request::ForcedDeploy { module, .. },
        ) => hook(DeployedModule::Inline(module)),
        openraft::EntryPayload::Normal(Request::DeployStored { module, .. }) => {
            hook(DeployedModule::Stored(module))
        }
        _ => {}
    }
}
