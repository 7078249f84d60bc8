//! The Raft log in redb, written by one thread that commits many entries per transaction.
//!
//! openraft's contract (`RaftLogStorage`): appended entries are readable when `append`
//! returns; the flush callback fires only once they are durable, in submission order; a vote
//! is durable before `save_vote` returns; writes take effect in the order they were submitted.
//!
//! How this store keeps it: every write goes, in order, through one channel to a writer thread.
//! The thread drains whatever is queued, applies it all in one redb write transaction, commits
//! (an fsync), and only then fires the callbacks, in order: group commit. Entries are readable at
//! once because `append` also puts them in `pending`, an in-memory overlay that readers consult
//! and the writer empties after each commit. Truncation, purge and vote writes wait for the
//! writer, so no reader can see an entry that a queued truncation has already removed.

use super::codec::{decode, encode, io_err};
use super::engine::{DeployHook, notify_deploy};
use crate::types::{Entry, LogId, TypeConfig, Vote};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

/// Entries by index, postcard-encoded.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Small records: vote, committed, last purged, format.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_FORMAT: &str = "format";
/// Bumped when the on-disk layout changes incompatibly.
const FORMAT: &[u8] = b"waft-log-v1";

/// Writes queued to the writer thread.
enum Op {
    Append {
        entries: Vec<(u64, LogId, Vec<u8>)>,
        callback: IOFlushed<TypeConfig>,
    },
    Meta {
        key: &'static str,
        value: Vec<u8>,
        done: Option<mpsc::SyncSender<io::Result<()>>>,
    },
    /// Deletes entries with index >= `from`.
    Truncate {
        from: u64,
        done: mpsc::SyncSender<io::Result<()>>,
    },
    /// Records `last_purged`, then deletes entries with index <= its index.
    Purge {
        upto: LogId,
        done: mpsc::SyncSender<io::Result<()>>,
    },
}

type Pending = Arc<Mutex<BTreeMap<u64, Entry>>>;

use crate::sync::lock_or_stop;

/// The redb-backed Raft log. See the module docs for how it meets openraft's contract.
pub struct RedbLog {
    db: Arc<Database>,
    pending: Pending,
    writer: mpsc::Sender<Op>,
    thread: Option<std::thread::JoinHandle<()>>,
    on_deploy: Option<DeployHook>,
}

impl Drop for RedbLog {
    fn drop(&mut self) {
        // Close the queue and wait for the writer, so the database file is released when the
        // store is gone (a restarted node in the same process can open it again).
        let (closed, _) = mpsc::channel();
        self.writer = closed;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Debug for RedbLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbLog").finish_non_exhaustive()
    }
}

impl RedbLog {
    /// Opens (or creates) the log database at `path` and starts its writer thread.
    ///
    /// A file that is not a redb database, is corrupt, or was written by an incompatible
    /// version is an error: the node must not start with an empty log in its place.
    pub fn open(path: &Path) -> io::Result<RedbLog> {
        let db = open_db(path).map_err(|e| {
            io_err(
                &format!(
                    "cannot open the log database {} (corrupt, or not a waft database?)",
                    path.display()
                ),
                e,
            )
        })?;
        let txn = db.begin_write().map_err(|e| io_err("begin", e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| io_err("open meta", e))?;
            txn.open_table(LOG).map_err(|e| io_err("open log", e))?;
            let format = meta
                .get(KEY_FORMAT)
                .map_err(|e| io_err("read format", e))?
                .map(|v| v.value().to_vec());
            match format {
                None => {
                    meta.insert(KEY_FORMAT, FORMAT)
                        .map_err(|e| io_err("write format", e))?;
                }
                Some(f) if f == FORMAT => {}
                Some(f) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} holds a log in format {:?}, this waft reads {:?}",
                            path.display(),
                            String::from_utf8_lossy(&f),
                            String::from_utf8_lossy(FORMAT)
                        ),
                    ));
                }
            }
        }
        txn.commit().map_err(|e| io_err("commit", e))?;
        let db = Arc::new(db);
        let pending: Pending = Arc::default();
        let (tx, rx) = mpsc::channel();
        let (wdb, wpending) = (db.clone(), pending.clone());
        let thread = std::thread::Builder::new()
            .name("waft-log-writer".into())
            .spawn(move || writer_loop(&wdb, &wpending, &rx))
            .map_err(|e| io_err("cannot start the log writer thread", e))?;
        Ok(RedbLog {
            db,
            pending,
            writer: tx,
            thread: Some(thread),
            on_deploy: None,
        })
    }

    /// Sets the hook called with the module of each appended deploy entry.
    pub fn on_deploy(mut self, hook: DeployHook) -> RedbLog {
        self.on_deploy = Some(hook);
        self
    }

    fn send(&self, op: Op) -> io::Result<()> {
        self.writer.send(op).map_err(|_| {
            io_err(
                "log writer",
                "the writer thread has stopped after an earlier error",
            )
        })
    }

    async fn send_and_wait(
        &self,
        make: impl FnOnce(mpsc::SyncSender<io::Result<()>>) -> Op,
    ) -> io::Result<()> {
        let (done, wait) = mpsc::sync_channel(1);
        self.send(make(done))?;
        tokio::task::spawn_blocking(move || wait.recv())
            .await
            .map_err(|e| io_err("log writer wait", e))?
            .map_err(|_| io_err("log writer", "the writer thread stopped before answering"))?
    }

    fn reader(&self) -> LogReader {
        LogReader {
            db: self.db.clone(),
            pending: self.pending.clone(),
        }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        read_meta(&self.db, key)
    }
}

/// Opens the database, waiting a little if a store being dropped in this process still holds it.
fn open_db(path: &Path) -> Result<Database, redb::DatabaseError> {
    let mut tries = 0;
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn read_meta<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> io::Result<Option<T>> {
    let txn = db.begin_read().map_err(|e| io_err("begin read", e))?;
    let meta = txn.open_table(META).map_err(|e| io_err("open meta", e))?;
    match meta.get(key).map_err(|e| io_err("read meta", e))? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

/// The writer thread: drains queued ops, applies them in one transaction, commits, answers.
fn writer_loop(db: &Database, pending: &Pending, rx: &mpsc::Receiver<Op>) {
    /// Enough to amortize an fsync without holding callbacks back for long.
    const MAX_OPS_PER_COMMIT: usize = 4096;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = write_batch(db, &batch);
        let failed = result.is_err();
        if let Err(e) = &result {
            tracing::error!(error = %e, "log write failed; this node stops accepting log writes");
        }
        for op in batch {
            let r = result
                .as_ref()
                .map(|_| ())
                .map_err(|e| io::Error::new(e.kind(), e.to_string()));
            match op {
                Op::Append { entries, callback } => {
                    if r.is_ok() {
                        let mut p = lock_or_stop(pending);
                        for (index, log_id, _) in &entries {
                            if p.get(index).is_some_and(|e| &e.log_id() == log_id) {
                                p.remove(index);
                            }
                        }
                    }
                    callback.io_completed(r);
                }
                Op::Meta { done, .. } => {
                    if let Some(done) = done {
                        let _ = done.send(r);
                    }
                }
                Op::Truncate { done, .. } | Op::Purge { done, .. } => {
                    let _ = done.send(r);
                }
            }
        }
        if failed {
            // After a failed commit the file's state is unknown to us: refuse everything that
            // follows rather than build on it. openraft stops the node on the error above.
            return;
        }
    }
}

fn write_batch(db: &Database, batch: &[Op]) -> io::Result<()> {
    let txn = db.begin_write().map_err(|e| io_err("begin write", e))?;
    {
        let mut log = txn.open_table(LOG).map_err(|e| io_err("open log", e))?;
        let mut meta = txn.open_table(META).map_err(|e| io_err("open meta", e))?;
        for op in batch {
            match op {
                Op::Append { entries, .. } => {
                    for (index, _, bytes) in entries {
                        log.insert(index, bytes.as_slice())
                            .map_err(|e| io_err("append", e))?;
                    }
                }
                Op::Meta { key, value, .. } => {
                    meta.insert(*key, value.as_slice())
                        .map_err(|e| io_err("write meta", e))?;
                }
                Op::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false)
                        .map_err(|e| io_err("truncate", e))?;
                }
                Op::Purge { upto, .. } => {
                    // last_purged first: if we crash mid-way, a restart knows what is gone.
                    meta.insert(KEY_PURGED, encode(upto)?.as_slice())
                        .map_err(|e| io_err("write last_purged", e))?;
                    log.retain_in(..=upto.index(), |_, _| false)
                        .map_err(|e| io_err("purge", e))?;
                }
            }
        }
    }
    txn.commit().map_err(|e| io_err("commit", e))
}

/// Reads the log: redb plus the overlay of entries not yet committed to it.
#[derive(Clone)]
pub struct LogReader {
    db: Arc<Database>,
    pending: Pending,
}

impl Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").finish_non_exhaustive()
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => Some(e.saturating_add(1)),
        Bound::Excluded(e) => Some(*e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl LogReader {
    fn entries(&self, start: u64, end: Option<u64>) -> io::Result<Vec<Entry>> {
        // Copy the overlay before reading redb: the writer removes an entry from the overlay
        // only after it is committed, so every entry is in one or the other.
        let overlay: Vec<Entry> = {
            let p = lock_or_stop(&self.pending);
            match end {
                Some(end) => p.range(start..end).map(|(_, e)| e.clone()).collect(),
                None => p.range(start..).map(|(_, e)| e.clone()).collect(),
            }
        };
        let txn = self.db.begin_read().map_err(|e| io_err("begin read", e))?;
        let log = txn.open_table(LOG).map_err(|e| io_err("open log", e))?;
        let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
        let iter = match end {
            Some(end) => log.range(start..end),
            None => log.range(start..),
        }
        .map_err(|e| io_err("read log", e))?;
        for item in iter {
            let (k, v) = item.map_err(|e| io_err("read log", e))?;
            out.insert(k.value(), decode("log entry", v.value())?);
        }
        for e in overlay {
            out.insert(e.index(), e);
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        self.entries(start, end)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        read_meta(&self.db, KEY_VOTE)
    }
}

impl RaftLogReader<TypeConfig> for RedbLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        self.reader().try_get_log_entries(range).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for RedbLog {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = self.read_meta(KEY_PURGED)?;
        let pending_last = lock_or_stop(&self.pending)
            .values()
            .next_back()
            .map(|e| e.log_id());
        let stored_last = {
            let txn = self.db.begin_read().map_err(|e| io_err("begin read", e))?;
            let log = txn.open_table(LOG).map_err(|e| io_err("open log", e))?;
            match log.last().map_err(|e| io_err("read log", e))? {
                Some((_, v)) => Some(decode::<Entry>("log entry", v.value())?.log_id()),
                None => None,
            }
        };
        let last = pending_last.or(stored_last).or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let value = encode(vote)?;
        self.send_and_wait(|done| Op::Meta {
            key: KEY_VOTE,
            value,
            done: Some(done),
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Queued behind the appends it covers, so it never runs ahead of the durable log; no
        // need to wait: losing the latest value only means replaying a little more on restart.
        let value = encode(&committed)?;
        self.send(Op::Meta {
            key: KEY_COMMITTED,
            value,
            done: None,
        })
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.read_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
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
        let mut encoded = Vec::new();
        {
            let mut p = lock_or_stop(&self.pending);
            for entry in entries {
                let bytes = encode(&entry)?;
                encoded.push((entry.index(), entry.log_id(), bytes));
                notify_deploy(self.on_deploy.as_ref(), &entry);
                p.insert(entry.index(), entry);
            }
        }
        self.send(Op::Append {
            entries: encoded,
            callback,
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        lock_or_stop(&self.pending).retain(|index, _| *index < from);
        self.send_and_wait(|done| Op::Truncate { from, done }).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index();
        lock_or_stop(&self.pending).retain(|index, _| *index > upto);
        self.send_and_wait(|done| Op::Purge { upto: log_id, done })
            .await
    }
}
