//! The snapshot file: everything a node needs to rebuild the replicated state.
//!
//! Layout: `WAFTSNP7`, a u32 header length, the postcard-encoded [`SnapshotHeader`], the bytes
//! of every module in header order, the state of every service in header order (a postcard
//! [`ServiceState`]: the history of its guest's instance and its pending timers; formats 3 and
//! 4 had the history alone, format 5's timers did not say when they were set; headers before
//! format 7 had no cluster version), and a trailer:
//! the sha256 of everything before it. Format 2 files (a service's state was its guest's snapshot, or a
//! checkpoint + journal of commands) are still read: see [`service_form`]; formats 2 and 3
//! kept no verifier findings with each version ([`VersionRecord::forced`]). A reader checks the trailer before
//! believing anything else, so a truncated or corrupted file (or transfer) is refused whole.
//! Sections are written and read one at a time: the file is never one buffer.

use crate::runtime::{ReplayCall, ReplayEntry, ReplayForm, ReplayPoint};
use crate::storage::codec::{decode, encode};
use crate::types::{Response, SnapshotMeta};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"WAFTSNP7";
/// The format this build writes.
pub const FORMAT: u8 = 7;
/// The oldest format this build reads.
const OLDEST_FORMAT: u8 = 2;
/// Largest header accepted when reading (it holds names and sessions, not bulk data).
const MAX_HEADER: u32 = 256 << 20;

/// A pending guest timer (kept with its service's state section from format 5 on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Due time, milliseconds since the Unix epoch (the log's clock).
    pub at_ms: u64,
    /// What the guest's `fire` is given.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The log index of the entry that set it: which setting of its key a delivery names.
    pub set_index: u64,
    /// The log's clock at that entry: `at_ms - set_ms` is the delay the guest asked for,
    /// which no node lets pass faster than its own monotonic clock (see `crate::timers`).
    pub set_ms: u64,
}

impl Timer {
    /// The delay the guest asked for when it set the timer.
    pub fn delay_ms(&self) -> u64 {
        self.at_ms.saturating_sub(self.set_ms)
    }
}

/// A pending timer as format 5 kept it: no record of when it was set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TimerV5 {
    at_ms: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// A service's state section as format 5 kept it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ServiceStateV5 {
    form: ReplayForm,
    timers: Vec<(String, TimerV5)>,
}

/// A service's state section from format 5 on: its guest's instance history and its pending
/// timers, by key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// The guest's instance history.
    pub form: ReplayForm,
    /// Pending timers.
    pub timers: Vec<(String, Timer)>,
}

/// A client's exactly-once record: the last sequence applied and its response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The highest sequence number applied for this client.
    pub seq: u64,
    /// The response to that command, returned again to a retry.
    pub response: Response,
    /// The log index that applied it (used to evict the oldest sessions deterministically).
    pub index: u64,
}

/// A service as recorded in a snapshot.
pub type ServiceRecord = ServiceRecordOf<VersionRecord>;

/// A service as recorded in a snapshot, with versions recorded as `V` (the layout of the
/// format being read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecordOf<V> {
    /// Service name.
    pub name: String,
    /// sha256 (hex) of the module serving it.
    pub module: String,
    /// Log index of the deploy that made this module active.
    pub deployed_at: u64,
    /// Length of the guest snapshot that follows in the file.
    pub state_len: u64,
    /// The state section is a postcard replay form (always, from format 3 on); in format 2,
    /// `false` meant the guest's own snapshot and `true` a checkpoint + journal of commands.
    pub replay: bool,
    /// The active version number.
    pub version: u32,
    /// Every version kept, oldest first (the active one last).
    pub history: Vec<V>,
}

/// One version of a service: which module, since which index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The version number.
    pub version: u32,
    /// sha256 (hex) of its module.
    pub module: String,
    /// Log index of the deploy (or rollback) that made it active.
    pub deployed_at: u64,
    /// The limits its guest runs under.
    pub limits: crate::types::ServiceLimits,
    /// Deployed with `--force` although the determinism verifier found these problems.
    pub forced: Option<String>,
}

/// A version as formats 2 and 3 recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecordV3 {
    version: u32,
    module: String,
    deployed_at: u64,
    limits: crate::types::ServiceLimits,
}

impl From<VersionRecordV3> for VersionRecord {
    fn from(v: VersionRecordV3) -> VersionRecord {
        VersionRecord {
            version: v.version,
            module: v.module,
            deployed_at: v.deployed_at,
            limits: v.limits,
            forced: None,
        }
    }
}

/// Everything in a snapshot except the bulk bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// openraft's metadata: last log id, membership, snapshot id.
    pub meta: SnapshotMeta,
    /// Time of the last applied entry (time never goes backwards across a snapshot either).
    pub last_timestamp_ms: u64,
    /// Engine fingerprint of the node that wrote it.
    pub engine: String,
    /// Exactly-once sessions, by client id.
    pub sessions: Vec<(u64, Session)>,
    /// Modules: sha256 (hex) and length, in file order.
    pub modules: Vec<(String, u64)>,
    /// Services in file order.
    pub services: Vec<ServiceRecord>,
    /// The active cluster version as of the last entry (`crate::version`; format 7 on,
    /// [`crate::version::FIRST`] before).
    pub cluster_version: u32,
}

/// A snapshot header as formats 2 to 6 wrote it, with versions recorded as `V`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotHeaderOf<V> {
    meta: SnapshotMeta,
    last_timestamp_ms: u64,
    engine: String,
    sessions: Vec<(u64, Session)>,
    modules: Vec<(String, u64)>,
    services: Vec<ServiceRecordOf<V>>,
}

impl<V: Into<VersionRecord>> SnapshotHeaderOf<V> {
    fn upgrade(self) -> SnapshotHeader {
        SnapshotHeader {
            meta: self.meta,
            last_timestamp_ms: self.last_timestamp_ms,
            engine: self.engine,
            sessions: self.sessions,
            modules: self.modules,
            services: self
                .services
                .into_iter()
                .map(|s| ServiceRecord {
                    name: s.name,
                    module: s.module,
                    deployed_at: s.deployed_at,
                    state_len: s.state_len,
                    replay: s.replay,
                    version: s.version,
                    history: s.history.into_iter().map(Into::into).collect(),
                })
                .collect(),
            cluster_version: crate::version::FIRST,
        }
    }
}

/// The snapshot data openraft passes around: an open snapshot file.
///
/// Holding the file open (not a path) keeps its contents readable even if a newer snapshot
/// replaces the file under the same name while this one is being sent.
#[derive(Debug)]
pub struct SnapshotFile {
    /// The open file, positioned anywhere (readers seek).
    pub file: File,
    /// Where it was when it was opened.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

impl SnapshotFile {
    /// Opens a snapshot file for reading.
    pub fn open(path: &Path) -> io::Result<SnapshotFile> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(SnapshotFile {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

/// Writes that also hash what they write.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a snapshot to `path` (via a temporary file, renamed into place once durable).
pub fn write(
    path: &Path,
    header: &SnapshotHeader,
    modules: &[&[u8]],
    states: &[&[u8]],
) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp)?;
    let mut w = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
    };
    let head = encode(header)?;
    w.write_all(MAGIC)?;
    w.write_all(
        &(u32::try_from(head.len()).map_err(|_| io::Error::other("snapshot header too large"))?)
            .to_le_bytes(),
    )?;
    w.write_all(&head)?;
    for m in modules {
        w.write_all(m)?;
    }
    for s in states {
        w.write_all(s)?;
    }
    let digest = w.hasher.finalize();
    let mut inner = w.inner;
    inner.write_all(&digest)?;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {what}"))
}

/// Checks the trailer: the sha256 of everything before the last 32 bytes.
pub fn verify(file: &mut File) -> io::Result<()> {
    let size = file.metadata()?.len();
    if size < (MAGIC.len() + 4 + 32) as u64 {
        return Err(corrupt("too short"));
    }
    file.seek(SeekFrom::Start(0))?;
    let mut body = BufReader::with_capacity(1 << 20, (&mut *file).take(size - 32));
    let mut hasher = Sha256::new();
    io::copy(&mut body, &mut HashWriter(&mut hasher))?;
    let mut trailer = [0u8; 32];
    file.read_exact(&mut trailer)?;
    if hasher.finalize().as_slice() != trailer {
        return Err(corrupt("checksum mismatch (truncated or corrupted)"));
    }
    Ok(())
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A snapshot being read back, section by section, after its checksum was verified.
pub struct Reader<'a> {
    input: Box<dyn BufRead + Send + 'a>,
    /// Bytes left before the trailer: no section may claim more.
    remaining: u64,
    /// The header.
    pub header: SnapshotHeader,
    /// The file's format (2 to [`FORMAT`]).
    pub format: u8,
}

impl std::fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl<'a> Reader<'a> {
    /// Verifies the file and reads its header.
    pub fn open(mut file: File) -> io::Result<Reader<'static>> {
        verify(&mut file)?;
        let size = file.metadata()?.len();
        file.seek(SeekFrom::Start(0))?;
        Reader::parse(Box::new(BufReader::with_capacity(1 << 20, file)), size)
    }

    /// Verifies a snapshot held in memory (a backup being restored) and reads its header.
    pub fn from_bytes(bytes: &'a [u8]) -> io::Result<Reader<'a>> {
        let size = bytes.len() as u64;
        if size < (MAGIC.len() + 4 + 32) as u64 {
            return Err(corrupt("too short"));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != trailer {
            return Err(corrupt("checksum mismatch (truncated or corrupted)"));
        }
        Reader::parse(Box::new(io::Cursor::new(bytes)), size)
    }

    fn parse(mut input: Box<dyn BufRead + Send + 'a>, size: u64) -> io::Result<Reader<'a>> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        let Some(format) = magic
            .strip_prefix(b"WAFTSNP")
            .filter(|f| f[0].is_ascii_digit())
            .map(|f| f[0] - b'0')
        else {
            return Err(corrupt("not a waft snapshot (bad magic)"));
        };
        if format < OLDEST_FORMAT {
            return Err(corrupt(format!(
                "written by an older waft (snapshot format {format}); this build reads formats \
                 {OLDEST_FORMAT} to {FORMAT}"
            )));
        }
        if format > FORMAT {
            return Err(corrupt(format!(
                "written by a newer waft (snapshot format {format}); this build reads formats \
                 {OLDEST_FORMAT} to {FORMAT}: use that waft version or a later one"
            )));
        }
        let mut len = [0u8; 4];
        input.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len > MAX_HEADER || u64::from(len) > size {
            return Err(corrupt(format!(
                "header of {len} bytes is over the limit or longer than the file"
            )));
        }
        let mut head = vec![0u8; len as usize];
        input.read_exact(&mut head)?;
        let header: SnapshotHeader = if format >= 7 {
            decode("snapshot header", &head)?
        } else if format >= 4 {
            decode::<SnapshotHeaderOf<VersionRecord>>("snapshot header", &head)?.upgrade()
        } else {
            decode::<SnapshotHeaderOf<VersionRecordV3>>("snapshot header", &head)?.upgrade()
        };
        let remaining = (size - 32 - 12)
            .checked_sub(u64::from(len))
            .ok_or_else(|| corrupt("header is longer than the file"))?;
        Ok(Reader {
            input,
            remaining,
            header,
            format,
        })
    }

    /// Reads the next section of `len` bytes.
    pub fn section(&mut self, len: u64) -> io::Result<Vec<u8>> {
        if len > self.remaining {
            return Err(corrupt("a section is longer than the file"));
        }
        self.remaining -= len;
        let len = usize::try_from(len).map_err(|_| corrupt("section too large"))?;
        let mut buf = vec![0u8; len];
        self.input.read_exact(&mut buf)?;
        Ok(buf)
    }
}

/// A service's state section as the history of its guest's instance, and its timers.
///
/// Format 6 stores a [`ServiceState`]; format 5 one whose timers do not say when they were set
/// (they count as set at the snapshot's last entry, `header`'s index and clock: a node never
/// lets them fall due sooner than the time left then); format 3 and 4 the history alone (no
/// timers). Format 2 stored the guest's own snapshot (or, for a guest
/// whose `snapshot` failed, a checkpoint and the commands applied since): it becomes an instance
/// opened at index 0 with that snapshot (and those commands). Nodes that load format 2 files
/// share instance histories again from the first rebase after the upgrade.
pub fn service_state(
    format: u8,
    header: &SnapshotHeader,
    record: &ServiceRecord,
    state: Vec<u8>,
) -> io::Result<ServiceState> {
    if format >= 6 {
        return decode("service state", &state);
    }
    if format == 5 {
        let old: ServiceStateV5 = decode("service state (format 5)", &state)?;
        let set_index = header.meta.last_log_id.map_or(0, |l| l.index);
        let set_ms = header.last_timestamp_ms;
        return Ok(ServiceState {
            form: old.form,
            timers: old
                .timers
                .into_iter()
                .map(|(key, t)| {
                    let timer = Timer {
                        at_ms: t.at_ms,
                        payload: t.payload,
                        set_index,
                        set_ms: set_ms.min(t.at_ms),
                    };
                    (key, timer)
                })
                .collect(),
        });
    }
    Ok(ServiceState {
        form: service_form(format, record, state)?,
        timers: Vec::new(),
    })
}

fn service_form(format: u8, record: &ServiceRecord, state: Vec<u8>) -> io::Result<ReplayForm> {
    if format >= 3 {
        return decode("replayable guest state", &state);
    }
    if !record.replay {
        return Ok(ReplayForm {
            opened_at: ReplayPoint::default(),
            base: Some(state),
            journal: Vec::new(),
        });
    }
    let old: ReplayFormV2 = decode("replayable guest state (format 2)", &state)?;
    Ok(ReplayForm {
        opened_at: ReplayPoint::default(),
        base: old.checkpoint,
        journal: old
            .journal
            .into_iter()
            .map(|e| ReplayEntry {
                at: ReplayPoint {
                    index: e.index,
                    term: e.term,
                    timestamp_ms: e.timestamp_ms,
                },
                call: ReplayCall::Apply(serde_bytes::ByteBuf::from(e.command)),
            })
            .collect(),
    })
}

/// Format 2's replay form: a checkpoint and the commands applied since.
#[derive(Deserialize)]
struct ReplayFormV2 {
    #[serde(with = "serde_bytes")]
    checkpoint: Option<Vec<u8>>,
    journal: Vec<ReplayEntryV2>,
}

#[derive(Deserialize)]
struct ReplayEntryV2 {
    index: u64,
    term: u64,
    timestamp_ms: u64,
    #[serde(with = "serde_bytes")]
    command: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A format-5 timer did not record when it was set: it counts as set at the snapshot's
    /// last entry and clock, so a node reckons no more than the time then left (never a
    /// delay longer than the guest asked for; none for a timer already due).
    #[test]
    fn format_5_timers_count_as_set_at_the_snapshots_last_entry() {
        let header = SnapshotHeader {
            meta: SnapshotMeta {
                last_log_id: Some(crate::types::LogId::new(
                    openraft::impls::leader_id_adv::LeaderId {
                        term: 2,
                        node_id: 1,
                    },
                    40,
                )),
                ..Default::default()
            },
            last_timestamp_ms: 10_000,
            engine: String::new(),
            sessions: Vec::new(),
            modules: Vec::new(),
            services: Vec::new(),
            cluster_version: crate::version::FIRST,
        };
        let record = ServiceRecord {
            name: "locks".into(),
            module: String::new(),
            deployed_at: 1,
            state_len: 0,
            replay: true,
            version: 1,
            history: Vec::new(),
        };
        let old = ServiceStateV5 {
            form: ReplayForm::default(),
            timers: vec![
                (
                    "later".into(),
                    TimerV5 {
                        at_ms: 15_000,
                        payload: b"p".to_vec(),
                    },
                ),
                (
                    "overdue".into(),
                    TimerV5 {
                        at_ms: 9_000,
                        payload: Vec::new(),
                    },
                ),
            ],
        };
        let bytes = encode(&old).expect("encodes");
        let state = service_state(5, &header, &record, bytes).expect("format 5 reads");
        let [(later, a), (overdue, b)] = &state.timers[..] else {
            panic!("{:?}", state.timers)
        };
        assert_eq!(
            (later.as_str(), a.set_index, a.delay_ms()),
            ("later", 40, 5_000)
        );
        assert_eq!(a.payload, b"p");
        assert_eq!((overdue.as_str(), b.delay_ms()), ("overdue", 0));
        // Format 6 keeps what it wrote.
        let now = ServiceState {
            form: ReplayForm::default(),
            timers: state.timers.clone(),
        };
        let again = service_state(6, &header, &record, encode(&now).expect("encodes"))
            .expect("format 6 reads");
        assert_eq!(again, now);
    }
}
