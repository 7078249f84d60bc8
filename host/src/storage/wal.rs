//! The Raft log as an append-only file (`waft node --log-engine wal`): a write-ahead log in the
//! manner of etcd's, where appending a batch costs one `write` and one `fdatasync` instead of a
//! B-tree commit.
//!
//! The file is a sequence of records, each `[length u32][crc32 u32][postcard body]` (little
//! endian; the checksum covers the body). A body is an entry, a truncation, a purge point, a
//! vote or the committed index. Opening the file replays the records in order (a later record
//! for an index replaces an earlier one; a truncation drops what follows it) into memory, where
//! every read is served from. The in-memory log is updated when a write is submitted, so entries
//! are readable at once; the writer thread appends the records and fsyncs, and only then fires
//! the callbacks, in order (group commit, as in [`super::RedbLog`]). The committed index is a
//! hint (a crash that loses it means a longer replay, and the leader tells the rest): it rides
//! in front of the next append instead of costing a write of its own.
//!
//! A torn tail (a crash in the middle of a write: a short record, zeros, or the rest of a write
//! that failed on a full disk) is cut off when the file is opened: a bad record with no valid
//! record after it. A bad record followed by a valid one is corruption: the store refuses to
//! open rather than lose acknowledged entries silently. A write that fails is cut off at once.
//!
//! The file is kept longer than its records, filled with zeros (written, not just reserved)
//! [`PREALLOCATE`] at a time: appending inside that space does not change the file's size, so
//! each `fdatasync` writes the records and nothing else; one that grows the file also writes
//! its inode (another device write), which would otherwise happen on every append. Replay stops
//! at the zeros; a record torn in the middle of them is cut off like one at the end of the file.
//!
//! A follower writes the entries it receives from the leader in place, on the Raft task that
//! appends them, and returns once they are synced: the Raft core has nothing else to do with
//! them before they are durable (it answers the leader only then), and the hand-off to the
//! writer thread and the wake-up back cost two thread switches per append (+6% writes per
//! second at 16 clients, docs/benchmarks.md). Appends over [`IN_PLACE_MAX`] (a follower
//! catching up), entries this node proposed as leader, and every other record go through the
//! writer thread, so the leader's Raft task keeps replicating while its own disk writes. An
//! append is written in place only when nothing sent to the writer thread is still unwritten,
//! so records reach the file in the order they were submitted either way.
//!
//! When a purge leaves the file mostly dead (over 64 MiB, less than a quarter of it live), the
//! writer rewrites it with only the live state (to a new file, fsynced, renamed over the old).

use crate::types::{Entry, LogId, NodeId, TypeConfig, Vote};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use super::{
    codec::{decode, encode, io_err},
    engine::{DeployHook, notify_deploy},
};

/// A file over this size, mostly dead after a purge, is rewritten.
const COMPACT_ABOVE: u64 = 64 << 20;
/// Zeros written past the records at a time, so that appends do not change the file's size.
const PREALLOCATE: u64 = 1 << 20;
/// The largest append a follower writes in place; larger ones (a follower catching up) go to
/// the writer thread, so the Raft task is never held for long.
const IN_PLACE_MAX: usize = 1 << 20;
/// The longest record accepted when reading (an entry carries at most a module or a backup).
const MAX_RECORD: usize = 1 << 30;

#[derive(serde::Serialize, serde::Deserialize)]
enum Record {
    Entry(Entry),
    /// Entries with index >= this are gone.
    Truncate(u64),
    /// Entries up to this log id are gone (it is the last purged).
    Purge(LogId),
    Vote(Vote),
    Committed(Option<LogId>),
}

#[derive(Default)]
struct Mem {
    /// Each entry with the size of its record in the file (about what it holds in memory).
    entries: BTreeMap<u64, (Entry, u32)>,
    /// The sum of those sizes.
    bytes: u64,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

impl Mem {
    /// Replays a record read from the file; `size` is its body's length.
    fn apply(&mut self, r: Record, size: usize) {
        match r {
            Record::Entry(e) => self.insert(e, size),
            Record::Truncate(from) => self.truncate(from),
            Record::Purge(upto) => self.purge(upto),
            Record::Vote(v) => self.vote = Some(v),
            Record::Committed(c) => self.committed = c,
        }
    }

    /// Entries with index >= `from` are gone.
    fn truncate(&mut self, from: u64) {
        let gone = self.entries.split_off(&from);
        self.forget(gone);
    }

    /// Entries up to `upto` are gone.
    fn purge(&mut self, upto: LogId) {
        let kept = self.entries.split_off(&(upto.index() + 1));
        let gone = std::mem::replace(&mut self.entries, kept);
        self.forget(gone);
        self.purged = Some(upto);
    }

    /// Holds entry `e`, whose record body is `size` bytes.
    fn insert(&mut self, e: Entry, size: usize) {
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        self.bytes += u64::from(size);
        if let Some((_, old)) = self.entries.insert(e.index(), (e, size)) {
            self.bytes -= u64::from(old);
        }
    }

    fn forget(&mut self, gone: BTreeMap<u64, (Entry, u32)>) {
        self.bytes -= gone.values().map(|(_, size)| u64::from(*size)).sum::<u64>();
    }

    /// Records that rebuild this state.
    fn records(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.entries.len() + 3);
        if let Some(v) = &self.vote {
            out.push(Record::Vote(*v));
        }
        out.push(Record::Committed(self.committed));
        if let Some(p) = self.purged {
            out.push(Record::Purge(p));
        }
        out.extend(self.entries.values().map(|(e, _)| Record::Entry(e.clone())));
        out
    }
}

type Shared = Arc<Mutex<Mem>>;

/// Reads what a [`WalLog`] holds in memory (its entries from the last purge on; for `/metrics`).
#[derive(Clone)]
pub struct LogMemory(Shared);

impl LogMemory {
    /// Entries held and their bytes (the size of their records in the file).
    pub fn held(&self) -> (usize, u64) {
        let m = lock_or_stop(&self.0);
        (m.entries.len(), m.bytes)
    }
}

impl Debug for LogMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMemory").finish_non_exhaustive()
    }
}

use crate::sync::lock_or_stop;

/// Bytes before a record's body: its length and checksum.
const FRAME_HEADER: usize = 8;

fn frame(record: &Record, out: &mut Vec<u8>) -> io::Result<()> {
    let body = encode(record)?;
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

enum Op {
    Write {
        bytes: Vec<u8>,
        callback: Option<IOFlushed<TypeConfig>>,
        done: Option<mpsc::SyncSender<io::Result<()>>>,
        /// A purge: see whether the file should be compacted afterwards.
        purged: bool,
    },
}

/// The append-only-file Raft log. See the module docs.
pub struct WalLog {
    mem: Shared,
    /// The committed index openraft last reported, not in the file yet (see `save_committed`).
    committed_hint: Option<Option<LogId>>,
    writer: mpsc::Sender<Op>,
    thread: Option<std::thread::JoinHandle<()>>,
    on_deploy: Option<DeployHook>,
    /// The file, shared with the writer thread (see the module docs).
    disk: Arc<Mutex<Disk>>,
    /// Writes sent to the writer thread and not in the file yet.
    queued: Arc<AtomicUsize>,
    /// This node's id: entries another leader proposed are written in place.
    node: Option<NodeId>,
}

impl Debug for WalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalLog").finish_non_exhaustive()
    }
}

impl Drop for WalLog {
    fn drop(&mut self) {
        // A clean stop leaves the latest committed index in the file (a shorter replay).
        if let Some(committed) = self.committed_hint.take() {
            let mut bytes = Vec::new();
            if frame(&Record::Committed(committed), &mut bytes).is_ok() {
                let _ = self.send(Op::Write {
                    bytes,
                    callback: None,
                    done: None,
                    purged: false,
                });
            }
        }
        let (closed, _) = mpsc::channel();
        self.writer = closed;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The records in `bytes`, each with the size of its body, and how many bytes are valid.
///
/// A bad record with nothing valid after it (zeros, or the rest of one write that failed: a
/// full disk, a crash) is a torn tail: replay stops there and the caller cuts it off. Such a
/// write was never synced, so never acknowledged. A bad record followed by a valid one is
/// corruption of what was acknowledged: refused.
fn replay(bytes: &[u8], path: &Path) -> io::Result<(Vec<(Record, usize)>, usize)> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < FRAME_HEADER {
            break; // a short header: torn
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD {
            if !valid_record_after(bytes, at) {
                break;
            }
            return Err(corrupt(path, at, "impossible record length"));
        }
        if rest.len() < FRAME_HEADER + len {
            break; // the last record was not written whole
        }
        let body = &rest[FRAME_HEADER..FRAME_HEADER + len];
        if crc32fast::hash(body) != crc {
            if !valid_record_after(bytes, at) {
                break; // the last record, torn
            }
            return Err(corrupt(path, at, "checksum mismatch"));
        }
        let record = decode::<Record>("log record", body).map_err(|e| corrupt(path, at, e))?;
        records.push((record, len));
        at += FRAME_HEADER + len;
    }
    Ok((records, at))
}

/// Whether a whole, valid record starts anywhere in `bytes` after the bad one at `bad`: its
/// length plausible, its checksum right and its body a record. Only then is the bad record in
/// the middle of the log rather than its torn tail. (Runs only when a record is bad.)
fn valid_record_after(bytes: &[u8], bad: usize) -> bool {
    (bad + 1..bytes.len().saturating_sub(FRAME_HEADER)).any(|at| {
        let rest = &bytes[at..];
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_RECORD || rest.len() < FRAME_HEADER + len {
            return false;
        }
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let body = &rest[FRAME_HEADER..FRAME_HEADER + len];
        crc32fast::hash(body) == crc && decode::<Record>("log record", body).is_ok()
    })
}

fn corrupt(path: &Path, at: usize, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the log {} is corrupt at byte {at} ({why}), not at its end: refusing to start \
             with entries missing",
            path.display()
        ),
    )
}

impl WalLog {
    /// Opens (or creates) the log file at `path`, replays it and starts the writer thread.
    pub fn open(path: &Path) -> io::Result<WalLog> {
        Self::open_compacting_above(path, COMPACT_ABOVE)
    }

    fn open_compacting_above(path: &Path, compact_above: u64) -> io::Result<WalLog> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(&format!("cannot open the log {}", path.display()), e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (records, valid) = replay(&bytes, path)?;
        // Zeros after the records are space written ahead, kept; anything else is a torn write.
        let mut allocated = bytes.len() as u64;
        if !bytes[valid..].iter().all(|b| *b == 0) {
            tracing::warn!(
                path = %path.display(),
                cut = bytes.len() - valid,
                "the log ended in a torn write; cutting it off"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
            allocated = valid as u64;
        }
        let mut mem = Mem::default();
        for (r, size) in records {
            mem.apply(r, size);
        }
        let mem: Shared = Arc::new(Mutex::new(mem));
        let (tx, rx) = mpsc::channel();
        let (wmem, wpath) = (mem.clone(), path.to_owned());
        let end = End {
            size: valid as u64,
            allocated,
        };
        let disk = Arc::new(Mutex::new(Disk {
            file,
            end,
            failed: None,
        }));
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            disk: disk.clone(),
            queued: queued.clone(),
            compact_above,
            path: wpath,
            mem: wmem,
        };
        let thread = std::thread::Builder::new()
            .name("waft-wal-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| io_err("cannot start the log writer thread", e))?;
        Ok(WalLog {
            mem,
            committed_hint: None,
            writer: tx,
            thread: Some(thread),
            on_deploy: None,
            disk,
            queued,
            node: None,
        })
    }

    /// Tells the log which node it belongs to: appends of entries another leader proposed
    /// are then written in place (see the module docs).
    pub fn of_node(mut self, id: NodeId) -> WalLog {
        self.node = Some(id);
        self
    }

    /// A handle that tells how much the log holds in memory.
    pub fn memory(&self) -> LogMemory {
        LogMemory(self.mem.clone())
    }

    /// Sets the hook called with the module of each appended deploy entry.
    pub fn on_deploy(mut self, hook: DeployHook) -> WalLog {
        self.on_deploy = Some(hook);
        self
    }

    fn send(&self, op: Op) -> io::Result<()> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.writer.send(op).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            io_err(
                "log writer",
                "the writer thread has stopped after an earlier error",
            )
        })
    }

    async fn write_and_wait(&self, record: Record, purged: bool) -> io::Result<()> {
        let mut bytes = Vec::new();
        frame(&record, &mut bytes)?;
        let (done, wait) = mpsc::sync_channel(1);
        self.send(Op::Write {
            bytes,
            callback: None,
            done: Some(done),
            purged,
        })?;
        tokio::task::spawn_blocking(move || wait.recv())
            .await
            .map_err(|e| io_err("log writer wait", e))?
            .map_err(|_| io_err("log writer", "the writer thread stopped before answering"))?
    }
}

/// Where the records end in the file, and how far zeros written ahead reach.
#[derive(Debug, Clone, Copy)]
struct End {
    size: u64,
    allocated: u64,
}

/// The log file as both writers (the writer thread and appends written in place) share it.
struct Disk {
    file: std::fs::File,
    end: End,
    /// Why writing stopped, once a write failed: every later write fails with it.
    failed: Option<String>,
}

impl Disk {
    /// Appends `bytes` after the records, synced if `sync`. After a failure, nothing more is
    /// written, and what the failed write left is cut off (or, if that fails too, by replay
    /// at the next start).
    fn write(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
        if let Some(why) = &self.failed {
            return Err(io_err(
                "log writer",
                format!("an earlier write failed ({why}); this node writes no more"),
            ));
        }
        let before = self.end;
        let result = append_at_end(&self.file, &mut self.end, bytes)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        if let Err(e) = &result {
            tracing::error!(error = %e, "log write failed; this node stops accepting log writes");
            self.failed = Some(e.to_string());
            // What the failed write left (part of it, or all of it unsynced) was never
            // acknowledged: cut it now, so a restart finds the log ending at its last whole
            // record. If even that fails, replay cuts it (a bad record with nothing valid after).
            match self
                .file
                .set_len(before.size)
                .and_then(|()| self.file.sync_all())
            {
                Ok(()) => {
                    self.end = End {
                        size: before.size,
                        allocated: before.size,
                    }
                }
                Err(cut) => tracing::warn!(error = %cut, "cannot cut the failed write off the log"),
            }
        }
        result
    }
}

/// Writes `buf` after the records (first writing zeros ahead when it would not fit in the
/// space already written), without syncing.
fn append_at_end(file: &std::fs::File, end: &mut End, buf: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let needed = end.size + buf.len() as u64;
    // Zeros go after the records and after the zeros already there, never over a record:
    // once a write-ahead failed, records are appended past the zeros written (`size` beyond
    // `allocated`), and zeros written from `allocated` would wipe records already synced and
    // acknowledged (a follower whose disk filled lost 16 entries so, and its leader stopped on
    // the log's reversion).
    let from = end.allocated.max(end.size);
    if needed > from {
        let to = needed + PREALLOCATE;
        let zeros = vec![0u8; (to - from) as usize];
        match file.write_all_at(&zeros, from) {
            Ok(()) => end.allocated = to,
            // No room to write ahead (a full disk, a file size limit): cut what was written
            // of it and append without; the records may still fit.
            Err(e) => {
                tracing::debug!(error = %e, "cannot write zeros ahead in the log");
                file.set_len(from)?;
                end.allocated = from;
            }
        }
    }
    file.write_all_at(buf, end.size)?;
    end.size = needed;
    Ok(())
}

/// The writer thread: appends what was sent to it in batches (group commit).
struct Writer {
    disk: Arc<Mutex<Disk>>,
    queued: Arc<AtomicUsize>,
    compact_above: u64,
    path: PathBuf,
    mem: Shared,
}

impl Writer {
    fn run(self, rx: &mpsc::Receiver<Op>) {
        const MAX_OPS: usize = 4096;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_OPS {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let mut buf = Vec::new();
            let mut purged = false;
            for Op::Write {
                bytes, purged: p, ..
            } in &batch
            {
                buf.extend_from_slice(bytes);
                purged |= *p;
            }
            // A batch that nobody waits for (the committed-index hint a dropped log writes) is
            // written without a sync of its own: the next synced write makes it durable, and
            // losing it to a crash only means a longer replay.
            let waited = batch
                .iter()
                .any(|Op::Write { callback, done, .. }| callback.is_some() || done.is_some());
            let result = {
                let mut disk = lock_or_stop(&self.disk);
                let disk = &mut *disk;
                match disk.write(&buf, waited || purged) {
                    Ok(()) if purged && disk.end.size >= self.compact_above => {
                        compact_if_dead(&mut disk.file, &mut disk.end, &self.path, &self.mem)
                    }
                    other => other,
                }
            };
            self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
            let failed = result.is_err();
            for Op::Write { callback, done, .. } in batch {
                let r = result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| io::Error::new(e.kind(), e.to_string()));
                if let Some(cb) = callback {
                    cb.io_completed(r);
                } else if let Some(done) = done {
                    let _ = done.send(r);
                }
            }
            if failed {
                return;
            }
        }
    }
}

/// Rewrites the file with only the live state when it is big and mostly dead.
fn compact_if_dead(
    file: &mut std::fs::File,
    end: &mut End,
    path: &Path,
    mem: &Shared,
) -> io::Result<()> {
    // The in-memory log may be ahead of the file (writes queued behind this one): rewriting
    // from it is still right, since replay is "later record wins" and the queued records are
    // appended after this snapshot of the state.
    let mut buf = Vec::new();
    for r in lock_or_stop(mem).records() {
        frame(&r, &mut buf)?;
    }
    if (buf.len() as u64) * 4 > end.size {
        return Ok(());
    }
    let tmp: PathBuf = path.with_extension("wal.compacting");
    {
        let mut t = std::fs::File::create(&tmp)?;
        t.write_all(&buf)?;
        t.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    *file = std::fs::OpenOptions::new().write(true).open(path)?;
    tracing::info!(from = end.size, to = buf.len(), "log file compacted");
    let size = buf.len() as u64;
    *end = End {
        size,
        allocated: size,
    };
    Ok(())
}

/// Reads the in-memory log.
#[derive(Clone)]
pub struct WalReader {
    mem: Shared,
}

impl Debug for WalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalReader").finish_non_exhaustive()
    }
}

impl RaftLogReader<TypeConfig> for WalReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(lock_or_stop(&self.mem)
            .entries
            .range(range)
            .map(|(_, (e, _))| e.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock_or_stop(&self.mem).vote)
    }
}

impl RaftLogReader<TypeConfig> for WalLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        WalReader {
            mem: self.mem.clone(),
        }
        .try_get_log_entries(range)
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock_or_stop(&self.mem).vote)
    }
}

impl RaftLogStorage<TypeConfig> for WalLog {
    type LogReader = WalReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let m = lock_or_stop(&self.mem);
        let last = m
            .entries
            .values()
            .next_back()
            .map(|(e, _)| e.log_id())
            .or(m.purged);
        Ok(LogState {
            last_purged_log_id: m.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        WalReader {
            mem: self.mem.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        lock_or_stop(&self.mem).vote = Some(*vote);
        self.write_and_wait(Record::Vote(*vote), false).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // A hint nobody waits for: it goes to the file in front of the next append (after
        // the entries it covers, which are already written) instead of costing a write and a
        // wake of the writer of its own. Losing it to a crash only means a longer replay
        // (the node learns the rest from the leader: `cluster::a_follower_restarted_with_a_
        // stale_committed_index_rejoins`); a clean stop writes it (`Drop`).
        lock_or_stop(&self.mem).committed = committed;
        self.committed_hint = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(lock_or_stop(&self.mem).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut bytes = Vec::new();
        if let Some(committed) = self.committed_hint.take() {
            frame(&Record::Committed(committed), &mut bytes)?;
        }
        let mut proposer = None;
        {
            let mut m = lock_or_stop(&self.mem);
            for entry in entries {
                proposer.get_or_insert(entry.log_id.leader_id.node_id);
                notify_deploy(self.on_deploy.as_ref(), &entry);
                let record = Record::Entry(entry);
                let before = bytes.len();
                frame(&record, &mut bytes)?;
                let Record::Entry(entry) = record else {
                    unreachable!("built above")
                };
                m.insert(entry, bytes.len() - before - FRAME_HEADER);
            }
        }
        // Entries another leader proposed (this node follows), not many, with nothing queued
        // before them.
        let in_place = self
            .node
            .is_some_and(|me| proposer.is_some_and(|p| p != me))
            && bytes.len() <= IN_PLACE_MAX
            && self.queued.load(Ordering::Acquire) == 0;
        if in_place {
            callback.io_completed(lock_or_stop(&self.disk).write(&bytes, true));
            return Ok(());
        }
        self.send(Op::Write {
            bytes,
            callback: Some(callback),
            done: None,
            purged: false,
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        lock_or_stop(&self.mem).truncate(from);
        self.write_and_wait(Record::Truncate(from), false).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        lock_or_stop(&self.mem).purge(log_id);
        self.write_and_wait(Record::Purge(log_id), true).await
    }
}

#[cfg(test)]
mod tests;
