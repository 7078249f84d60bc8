//! The function cache: compiled code below the module level, for wasmtime's incremental
//! compilation (Cranelift keys each function's compilation by its content and the target).
//!
//! A new version of a big guest is mostly the same code: an 18 MiB Python guest with one
//! function added still embeds the same interpreter. Compiling it from scratch took every node
//! a minute on a busy machine; with this cache a node compiles only the functions it has not
//! compiled before. Entries live in `CACHE_DIR/functions/XX/SHA256` (the sha256 of Cranelift's
//! key), each with the sha256 of its value in front, so a damaged file is a miss, never wrong
//! code. Nothing here is replicated: a node without the cache compiles the same code, slower.

use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Cranelift's per-function cache, on disk.
#[derive(Debug)]
pub struct FunctionCache {
    dir: PathBuf,
}

impl FunctionCache {
    /// A cache in `dir` (created on first insert).
    pub fn new(dir: &Path) -> FunctionCache {
        FunctionCache {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        let name = hex::encode(Sha256::digest(key));
        self.dir.join(&name[..2]).join(name)
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let mut bytes = std::fs::read(self.path(key)).ok()?;
        if bytes.len() < 32 || Sha256::digest(&bytes[32..]).as_slice() != &bytes[..32] {
            return None;
        }
        bytes.drain(..32);
        Some(Cow::Owned(bytes))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let path = self.path(key);
        let write = || -> std::io::Result<()> {
            let dir = path.parent().expect("a cache entry is in a directory");
            std::fs::create_dir_all(dir)?;
            // Write then rename: a reader never sees half an entry under the real name.
            let tmp = dir.join(format!(
                "{}.{:?}.tmp",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
                std::thread::current().id()
            ));
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&Sha256::digest(&value))?;
            file.write_all(&value)?;
            drop(file);
            std::fs::rename(&tmp, &path)
        };
        write().is_ok()
    }
}
