//! The function cache: compiled code below the module level, for wasmtime's incremental
//! compilation (Cranelift keys each function's compilation by its content and the target).
//!
//! A new version of a big guest is mostly the same code: an 18 MiB Python guest with one
//! function added still embeds the same interpreter. Compiling it from scratch took every node
//! a minute on a busy machine; with this cache a node compiles only the functions it has not
//! compiled before. Nothing here is replicated: a node without the cache compiles the same
//! code, slower.
//!
//! Entries are appended to pack files in `CACHE_DIR/functions` (one per process that writes;
//! a file per entry cost a big module's first compile 40% more, in file creations): each
//! record is the sha256 of Cranelift's key, the value's length, the sha256 of the value and the
//! value. The packs present when the cache is first used are indexed; a record cut short (a
//! crash) ends its pack's index, and a value whose checksum does not match is a miss, never
//! wrong code.

use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, RwLock};

/// Bytes before a record's value: key hash, length, value hash.
const HEADER: usize = 32 + 4 + 32;

/// Cranelift's per-function cache, on disk.
#[derive(Debug)]
pub struct FunctionCache {
    dir: PathBuf,
    /// The packs and where each entry is, built on first use.
    index: OnceLock<RwLock<Index>>,
    /// The pack this process appends to, opened on the first insert.
    writer: Mutex<Option<(usize, File, u64)>>,
}

#[derive(Debug, Default)]
struct Index {
    packs: Vec<File>,
    /// Key hash → (pack, offset of the value, length).
    entries: HashMap<[u8; 32], (usize, u64, u32)>,
}

impl FunctionCache {
    /// A cache in `dir` (created on first insert).
    pub fn new(dir: &Path) -> FunctionCache {
        FunctionCache {
            dir: dir.to_path_buf(),
            index: OnceLock::new(),
            writer: Mutex::new(None),
        }
    }

    fn index(&self) -> &RwLock<Index> {
        self.index
            .get_or_init(|| RwLock::new(Index::load(&self.dir).unwrap_or_default()))
    }

    fn append(&self, key: [u8; 32], value: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(value.len()).map_err(std::io::Error::other)?;
        let mut writer = crate::sync::lock_anyway(&self.writer);
        if writer.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            let name = format!(
                "pack-{}-{:016x}.bin",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            );
            let file = std::fs::OpenOptions::new()
                .create_new(true)
                .read(true)
                .append(true)
                .open(self.dir.join(name))?;
            let reader = file.try_clone()?;
            let mut index = crate::sync::write_anyway(self.index());
            index.packs.push(reader);
            *writer = Some((index.packs.len() - 1, file, 0));
        }
        let (pack, file, end) = writer.as_mut().expect("opened above");
        let mut record = Vec::with_capacity(HEADER + value.len());
        record.extend_from_slice(&key);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&Sha256::digest(value));
        record.extend_from_slice(value);
        file.write_all(&record)?;
        let at = *end + HEADER as u64;
        *end += record.len() as u64;
        let pack = *pack;
        drop(writer);
        crate::sync::write_anyway(self.index())
            .entries
            .insert(key, (pack, at, len));
        Ok(())
    }
}

impl Index {
    /// Indexes every pack in `dir`.
    fn load(dir: &Path) -> std::io::Result<Index> {
        let mut index = Index::default();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(index);
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with("pack-") && name.ends_with(".bin")) {
                continue;
            }
            let Ok(mut file) = File::open(entry.path()) else {
                continue;
            };
            let size = file.metadata()?.len();
            let pack = index.packs.len();
            let mut at = 0u64;
            let mut header = [0u8; HEADER];
            // A record cut short (a crash while appending) ends the pack.
            while at + HEADER as u64 <= size {
                file.seek(SeekFrom::Start(at))?;
                file.read_exact(&mut header)?;
                let len = u32::from_le_bytes(header[32..36].try_into().expect("4 bytes"));
                let value_at = at + HEADER as u64;
                if value_at + u64::from(len) > size {
                    break;
                }
                let key: [u8; 32] = header[..32].try_into().expect("32 bytes");
                index.entries.insert(key, (pack, value_at, len));
                at = value_at + u64::from(len);
            }
            index.packs.push(file);
        }
        Ok(index)
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let key: [u8; 32] = Sha256::digest(key).into();
        let index = crate::sync::read_anyway(self.index());
        let (pack, at, len) = *index.entries.get(&key)?;
        let mut bytes = vec![0u8; 32 + len as usize];
        // The value's checksum sits just before it.
        index.packs[pack].read_exact_at(&mut bytes, at - 32).ok()?;
        drop(index);
        if Sha256::digest(&bytes[32..]).as_slice() != &bytes[..32] {
            return None;
        }
        bytes.drain(..32);
        Some(Cow::Owned(bytes))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let key: [u8; 32] = Sha256::digest(key).into();
        self.append(key, &value).is_ok()
    }
}
