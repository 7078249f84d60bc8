//! The module store: every node keeps guest modules on disk, by sha256, outside the log.
//!
//! A deploy entry names its module by hash and size; the bytes travel once per node, in chunks,
//! on streams of their own (see `crate::raft::modules`): the leader has every voter fetch the
//! module before it proposes the deploy, and a node that lacks a module when it applies one
//! (a restart, a new learner, a follower that was down) fetches it from a peer first. Snapshots
//! and backups carry each module they use once; installing one fills the store.
//!
//! Files: `<sha256>.wasm`, complete and checked; `<sha256>.part`, a transfer in progress (kept
//! across restarts, so a broken transfer resumes where it stopped); `*.tmp`, being written.
//! A module no kept version uses is removed once it is older than [`UNUSED_GRACE`] (a module
//! fetched for a deploy not yet applied is not in any version yet).

use crate::runtime::ModuleHash;
use crate::types::NodeId;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a module no version uses stays (it may belong to a deploy being proposed).
pub const UNUSED_GRACE: Duration = Duration::from_secs(3600);
/// Size of one chunk read from a module file and sent to a peer.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Modules on disk, by sha256. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ModuleStore {
    dir: Arc<PathBuf>,
}

/// A module's bytes from a peer, chunk by chunk; ends after the last byte.
pub type ModuleBytes = BoxStream<'static, Result<Vec<u8>, String>>;

/// How a node reads a module from a peer; the node provides it (the Raft network).
pub trait ModulePeers: Send + Sync {
    /// This node's id (never asked for its own modules).
    fn me(&self) -> NodeId;
    /// Opens a stream of module `sha256`'s bytes, from byte `offset` on, on node `node` at
    /// `addr`. The stream ends after the last byte.
    fn open(
        &self,
        node: NodeId,
        addr: String,
        sha256: String,
        offset: u64,
    ) -> BoxFuture<'static, Result<ModuleBytes, String>>;
    /// Opens a stream of node `node`'s compiled code for module `sha256`, for an engine whose
    /// artifact key is `key`, with its size (see `crate::storage::compiled`). Only between
    /// members that share compiled code; by default, never.
    fn open_compiled(
        &self,
        node: NodeId,
        addr: String,
        sha256: String,
        key: String,
    ) -> BoxFuture<'static, Result<(u64, ModuleBytes), String>> {
        let _ = (node, addr, sha256, key);
        Box::pin(async { Err("this node does not share compiled code".to_owned()) })
    }
}

impl ModuleStore {
    /// The store in `dir` (created when missing).
    pub fn open(dir: &Path) -> io::Result<ModuleStore> {
        std::fs::create_dir_all(dir)?;
        // A write interrupted by a crash leaves a temporary file nobody will finish.
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(ModuleStore {
            dir: Arc::new(dir.to_path_buf()),
        })
    }

    fn path(&self, hash: &ModuleHash) -> PathBuf {
        self.dir.join(format!("{}.wasm", hash.to_hex()))
    }

    fn partial(&self, hash: &ModuleHash) -> PathBuf {
        self.dir.join(format!("{}.part", hash.to_hex()))
    }

    /// Whether the module is here (complete).
    pub fn contains(&self, hash: &ModuleHash) -> bool {
        self.path(hash).exists()
    }

    /// The module's size, when it is here.
    pub fn size(&self, hash: &ModuleHash) -> Option<u64> {
        std::fs::metadata(self.path(hash)).ok().map(|m| m.len())
    }

    /// The module's bytes, checked against the hash (a damaged file is removed, so that the
    /// next fetch replaces it). Blocking.
    pub fn read(&self, hash: &ModuleHash) -> io::Result<Vec<u8>> {
        let path = self.path(hash);
        let bytes = std::fs::read(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("module {hash} is not in the module store: {e}"),
            )
        })?;
        if ModuleHash::of(&bytes) != *hash {
            let _ = std::fs::remove_file(&path);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("module file {} was damaged (removed)", path.display()),
            ));
        }
        Ok(bytes)
    }

    /// Opens the module's file for reading (to send it), at `offset`.
    pub fn reader(&self, hash: &ModuleHash, offset: u64) -> io::Result<std::fs::File> {
        use std::io::Seek;
        let mut file = std::fs::File::open(self.path(hash))?;
        file.seek(io::SeekFrom::Start(offset))?;
        Ok(file)
    }

    /// Stores `bytes` (durably: written, synced, renamed into place) and returns their hash.
    /// Blocking.
    pub fn insert(&self, bytes: &[u8]) -> io::Result<ModuleHash> {
        let hash = ModuleHash::of(bytes);
        if self.contains(&hash) {
            return Ok(hash);
        }
        let tmp = self.dir.join(format!(
            "{}.{}.tmp",
            hash.to_hex(),
            std::process::id() as u64 ^ rand_suffix()
        ));
        {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        self.publish(&tmp, &hash)?;
        Ok(hash)
    }

    fn publish(&self, from: &Path, hash: &ModuleHash) -> io::Result<()> {
        std::fs::rename(from, self.path(hash))?;
        std::fs::File::open(&*self.dir)?.sync_all()
    }

    /// Hashes of the complete modules here.
    pub fn hashes(&self) -> Vec<ModuleHash> {
        let Ok(entries) = std::fs::read_dir(&*self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<ModuleHash> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                ModuleHash::from_hex(name.strip_suffix(".wasm")?)
            })
            .collect();
        out.sort();
        out
    }

    /// Removes modules (and unfinished transfers) not in `used` that are older than `grace`.
    /// Returns how many files it removed. Blocking.
    pub fn retain(&self, used: &BTreeSet<ModuleHash>, grace: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&*self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hash) = name
                .strip_suffix(".wasm")
                .or_else(|| name.strip_suffix(".part"))
                .and_then(ModuleHash::from_hex)
            else {
                continue;
            };
            if used.contains(&hash) {
                continue;
            }
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            if age >= grace && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
                tracing::debug!(file = %name, "removed a module no version uses");
            }
        }
        removed
    }

    /// Fetches module `hash` from `sources` (node id, address) until it is here: each source in
    /// turn, resuming from the bytes a broken transfer left, checked against the hash before it
    /// is kept. Gives up at `deadline` (`None`: never; a node that must apply a deploy has no
    /// other way forward) with the last error, and at once when this node cannot write the
    /// module (a full disk): no peer can help with that.
    pub async fn fetch(
        &self,
        peers: &dyn ModulePeers,
        sources: &[(NodeId, String)],
        hash: &ModuleHash,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), FetchError> {
        let me = peers.me();
        let sources: Vec<&(NodeId, String)> = sources.iter().filter(|(n, _)| *n != me).collect();
        let mut pause = Duration::from_millis(100);
        let mut last_error = String::from("no other node is known to hold it");
        let mut round = 0u64;
        loop {
            round += 1;
            if self.contains(hash) {
                return Ok(());
            }
            for (node, addr) in &sources {
                match self.fetch_from(peers, *node, addr, hash).await {
                    Ok(()) => {
                        tracing::info!(module = %hash, node, "fetched a module from a peer");
                        return Ok(());
                    }
                    Err(FetchError::Local(e)) => return Err(FetchError::Local(e)),
                    Err(FetchError::Remote(e)) => {
                        last_error = format!("node {node} at {addr}: {e}")
                    }
                }
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() + pause >= d) {
                return Err(FetchError::Remote(format!(
                    "cannot fetch module {hash}: {last_error}"
                )));
            }
            if round.is_multiple_of(10) {
                tracing::warn!(
                    module = %hash,
                    error = %last_error,
                    "still fetching a module this node must run; no peer has given it yet"
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// One attempt from one peer: appends to the partial file, then checks and keeps it.
    async fn fetch_from(
        &self,
        peers: &dyn ModulePeers,
        node: NodeId,
        addr: &str,
        hash: &ModuleHash,
    ) -> Result<(), FetchError> {
        use tokio::io::AsyncWriteExt;
        let partial = self.partial(hash);
        let offset = tokio::fs::metadata(&partial).await.map_or(0, |m| m.len());
        let mut stream = peers
            .open(node, addr.to_owned(), hash.to_hex(), offset)
            .await
            .map_err(FetchError::Remote)?;
        let cannot_write =
            |e: io::Error| FetchError::Local(format!("cannot write {}: {e}", partial.display()));
        // tokio's file: the writes run on the blocking pool, never on a runtime worker.
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .await
            .map_err(cannot_write)?;
        let mut received: Result<(), FetchError> = Ok(());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    if let Err(e) = file.write_all(&bytes).await {
                        received = Err(cannot_write(e));
                        break;
                    }
                }
                Err(e) => {
                    received = Err(FetchError::Remote(e));
                    break;
                }
            }
        }
        // Whatever arrived reaches the file before the next attempt reads its length to resume.
        let flushed = file.flush().await.map_err(cannot_write);
        drop(file);
        if let Err(e) = received.and(flushed) {
            if matches!(e, FetchError::Local(_)) {
                // Nothing half-written stays: the next attempt starts over.
                let _ = tokio::fs::remove_file(&partial).await;
            }
            return Err(e);
        }
        let (store, hash, partial) = (self.clone(), *hash, partial.clone());
        tokio::task::spawn_blocking(move || store.finish(&partial, &hash))
            .await
            .map_err(|e| FetchError::Local(e.to_string()))?
    }

    /// Checks a finished transfer and keeps it, or throws it away (the next attempt starts over).
    fn finish(&self, partial: &Path, hash: &ModuleHash) -> Result<(), FetchError> {
        let check = || -> io::Result<bool> {
            let mut file = std::fs::File::open(partial)?;
            let mut h = Sha256::new();
            let mut buf = vec![0; CHUNK_BYTES];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            file.sync_all()?;
            Ok(<[u8; 32]>::from(h.finalize()) == hash.0)
        };
        match check() {
            Ok(true) => self
                .publish(partial, hash)
                .map_err(|e| FetchError::Local(format!("cannot keep module {hash}: {e}"))),
            Ok(false) => {
                let _ = std::fs::remove_file(partial);
                Err(FetchError::Remote(format!(
                    "the bytes received do not hash to {hash} (discarded)"
                )))
            }
            Err(e) => Err(FetchError::Local(format!(
                "cannot check module {hash}: {e}"
            ))),
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// This node cannot store the module (a full disk, an I/O error): no peer can help.
    #[error("{0}")]
    Local(String),
    /// No peer gave it in time (the last peer's reason).
    #[error("{0}")]
    Remote(String),
}

/// A few random bits for a temporary file's name (two writers of one module never collide).
pub(crate) fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}
