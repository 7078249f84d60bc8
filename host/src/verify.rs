//! The determinism verifier (`waft exec --verify`): runs the same commands through several
//! histories of one guest and names the first place where they disagree.
//!
//! waft keeps replicas identical by giving every replica's instance the same history (see
//! `runtime::Guest`). That makes replicas agree even with a guest whose behaviour depends on its
//! instance's past, but such a guest still behaves differently from what its author meant the
//! moment its instance is replaced (a rebase, a hot-swap, a restore): a generator seeded at
//! start-up starts over, state kept outside `snapshot` is lost, a hash map serialized in
//! iteration order comes back in another order. The verifier finds those guests before they
//! are deployed: a deterministic guest answers the same in every history below.

use crate::runtime::{ApplyCtx, Guest, GuestError, GuestModule, Runtime};
use std::fmt;
use std::sync::Arc;

/// One way to run the commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// One instance throughout: the reference.
    Continuous,
    /// Like the reference until entry `after` (1-based count of entries applied), then a fresh
    /// instance restored from the snapshot taken there.
    RestoredAfter(usize),
    /// A fresh instance restored from the previous entry's snapshot for every entry.
    FreshPerEntry,
    /// Like the reference until entry `at`; then rebuilt as trap recovery does: a fresh
    /// instance restored from the snapshot taken after entry `from`, the entries after it
    /// replayed.
    Recovered { from: usize, at: usize },
    /// The reference with every query run after every entry.
    QueriesInterleaved,
    /// All entries in one `apply-batch` call.
    Batched,
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            History::Continuous => write!(f, "one instance throughout"),
            History::RestoredAfter(n) => {
                write!(
                    f,
                    "a fresh instance restored from the snapshot after entry {n}"
                )
            }
            History::FreshPerEntry => write!(f, "a fresh instance per entry"),
            History::Recovered { from, at } => write!(
                f,
                "a trap recovery after entry {at} (checkpoint after entry {from}, then replay)"
            ),
            History::QueriesInterleaved => write!(f, "the queries run after every entry"),
            History::Batched => write!(f, "all entries in one apply-batch call"),
        }
    }
}

/// What one history produced.
#[derive(Debug, Clone)]
struct Run {
    replies: Vec<Result<Vec<u8>, GuestError>>,
    snapshot: Result<Vec<u8>, GuestError>,
}

/// A difference the verifier found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The history that disagreed with the reference (or, for a canonical-snapshot failure,
    /// the reference itself).
    pub history: String,
    /// Which entry (1-based) or `None` for the final snapshot.
    pub entry: Option<usize>,
    /// What the reference produced.
    pub expected: String,
    /// What this history produced.
    pub got: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry {
            Some(n) => write!(
                f,
                "entry {n}: one instance throughout replied {}, {} replied {}",
                self.expected, self.history, self.got
            ),
            None => write!(
                f,
                "final snapshot: one instance throughout gave {}, {} gave {}",
                self.expected, self.history, self.got
            ),
        }
    }
}

/// The verifier's verdict.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Histories run (the reference included).
    pub histories: Vec<String>,
    /// Every history that disagreed, with its first difference.
    pub findings: Vec<Finding>,
}

impl Report {
    /// True when every history agreed.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Shows bytes as text when they are printable UTF-8, else as hex; long values are cut.
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 160;
    let text = match std::str::from_utf8(bytes) {
        Ok(t) if !t.chars().any(|c| c.is_control() && c != '\n') => format!("{t:?}"),
        _ => format!("0x{}", hex::encode(bytes)),
    };
    if text.len() > MAX {
        let cut = (0..=MAX)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        format!("{}... ({} bytes)", &text[..cut], bytes.len())
    } else {
        text
    }
}

/// Two different replies, shown around their first difference when they are long.
fn show_pair(a: &Result<Vec<u8>, GuestError>, b: &Result<Vec<u8>, GuestError>) -> (String, String) {
    const BEFORE: usize = 40;
    match (a, b) {
        (Ok(x), Ok(y)) if x.len().max(y.len()) > 160 => {
            let at = x
                .iter()
                .zip(y.iter())
                .position(|(p, q)| p != q)
                .unwrap_or(x.len().min(y.len()));
            let from = at.saturating_sub(BEFORE);
            let window = |v: &[u8]| {
                let end = (at + 80).min(v.len());
                format!(
                    "(from byte {from} of {}) {}",
                    v.len(),
                    show(&v[from.min(v.len())..end])
                )
            };
            (window(x), window(y))
        }
        _ => (show_result(a), show_result(b)),
    }
}

fn show_result(r: &Result<Vec<u8>, GuestError>) -> String {
    match r {
        Ok(b) => show(b),
        Err(e) => format!("error: {e}"),
    }
}

fn show_snapshot(r: &Result<Vec<u8>, GuestError>) -> String {
    use sha2::Digest;
    match r {
        Ok(b) => format!(
            "{} bytes, sha256 {}",
            b.len(),
            &hex::encode(sha2::Sha256::digest(b))[..16]
        ),
        Err(e) => format!("error: {e}"),
    }
}

/// The commands and queries to verify, and the context they are applied with.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Commands, applied at indexes 1, 2, ...
    pub commands: Vec<Vec<u8>>,
    /// Queries for the interleaved history (when empty, the commands are used as queries).
    pub queries: Vec<Vec<u8>>,
    /// The leader timestamp of the first command; each next one is 1 ms later.
    pub timestamp_ms: u64,
}

impl Plan {
    fn ctx(&self, i: usize) -> ApplyCtx {
        ApplyCtx {
            index: i as u64 + 1,
            term: 1,
            timestamp_ms: self.timestamp_ms + i as u64,
        }
    }
}

/// Verifies `module` (bytes) on `commands` in a runtime of its own that never rebases on its
/// own (as `waft exec --verify` does), with `limits`. With `cache_dir` (a node's), the code
/// compiled there is loaded instead of compiled again (the checkpoint policy changes no code):
/// seconds for a large Python guest.
pub fn verify_fresh(
    limits: crate::runtime::Limits,
    cache_dir: Option<std::path::PathBuf>,
    module: &[u8],
    commands: Vec<Vec<u8>>,
) -> anyhow::Result<Report> {
    let runtime = Runtime::new(crate::runtime::RuntimeConfig {
        limits,
        checkpoints: crate::runtime::CheckpointPolicy {
            entries: usize::MAX,
            bytes: usize::MAX,
        },
        cache_dir,
        ..crate::runtime::RuntimeConfig::default()
    })?;
    let module = runtime.load(module)?;
    let plan = Plan {
        commands,
        queries: Vec::new(),
        timestamp_ms: 1_700_000_000_000,
    };
    verify(&runtime, &module, &plan)
}

/// Runs the plan through every history and compares each with the reference.
///
/// `runtime` should never rebase on its own (a checkpoint policy that is never due), so that
/// "one instance throughout" means what it says.
pub fn verify(runtime: &Runtime, module: &Arc<GuestModule>, plan: &Plan) -> anyhow::Result<Report> {
    let n = plan.commands.len();
    let mut histories = vec![History::Continuous];
    let mut points: Vec<usize> = [1, n / 3, n / 2, (2 * n) / 3, n.saturating_sub(1)]
        .into_iter()
        .filter(|p| *p >= 1 && *p < n)
        .collect();
    points.dedup();
    histories.extend(points.iter().map(|p| History::RestoredAfter(*p)));
    histories.push(History::FreshPerEntry);
    if n >= 2 {
        histories.push(History::Recovered {
            from: (n / 3).max(1).min(n - 1),
            at: n.saturating_sub(1).max(1),
        });
    }
    histories.push(History::QueriesInterleaved);
    if n >= 2 && module.info().can_batch() {
        histories.push(History::Batched);
    }
    let reference = run(runtime, module, plan, &History::Continuous)?;
    let mut report = Report {
        histories: histories.iter().map(ToString::to_string).collect(),
        findings: Vec::new(),
    };
    // A snapshot is canonical when a fresh instance restored from it snapshots to the same
    // bytes: replicas compare snapshots, and an upgrade or restore round-trips them.
    if let Ok(bytes) = &reference.snapshot {
        let mut fresh = open(runtime, module, plan.ctx(n.saturating_sub(1)), Some(bytes))?;
        let again = fresh.snapshot();
        if again.as_ref().ok() != Some(bytes) {
            report.findings.push(Finding {
                history: "a fresh instance restored from the final snapshot".into(),
                entry: None,
                expected: show_snapshot(&reference.snapshot),
                got: show_snapshot(&again),
            });
        }
    }
    for history in histories.iter().skip(1) {
        let got = run(runtime, module, plan, history)?;
        let first = match history {
            History::RestoredAfter(k) => *k,
            History::Recovered { at, .. } => *at,
            _ => 0,
        };
        let differs = (first..n).find(|&i| reference.replies[i] != got.replies[i]);
        if let Some(i) = differs {
            let (expected, got) = show_pair(&reference.replies[i], &got.replies[i]);
            report.findings.push(Finding {
                history: history.to_string(),
                entry: Some(i + 1),
                expected,
                got,
            });
        } else if reference.snapshot != got.snapshot {
            report.findings.push(Finding {
                history: history.to_string(),
                entry: None,
                expected: show_snapshot(&reference.snapshot),
                got: show_snapshot(&got.snapshot),
            });
        }
    }
    Ok(report)
}

fn open(
    runtime: &Runtime,
    module: &Arc<GuestModule>,
    ctx: ApplyCtx,
    base: Option<&[u8]>,
) -> anyhow::Result<Guest> {
    runtime
        .open(
            module,
            "verify",
            runtime.limits().clone(),
            ctx,
            base.map(Arc::from),
        )
        .map_err(|e| anyhow::anyhow!("cannot open an instance: {e}"))
}

fn run(
    runtime: &Runtime,
    module: &Arc<GuestModule>,
    plan: &Plan,
    history: &History,
) -> anyhow::Result<Run> {
    let n = plan.commands.len();
    let queries = if plan.queries.is_empty() {
        &plan.commands
    } else {
        &plan.queries
    };
    let mut guest = runtime
        .instantiate(module, "verify")
        .map_err(|e| anyhow::anyhow!("cannot instantiate: {e}"))?;
    let mut replies = Vec::with_capacity(n);
    if *history == History::Batched {
        let entries: Vec<(ApplyCtx, &[u8])> = plan
            .commands
            .iter()
            .enumerate()
            .map(|(i, c)| (plan.ctx(i), c.as_slice()))
            .collect();
        replies = guest.apply_batch(&entries);
        let snapshot = guest.snapshot();
        return Ok(Run { replies, snapshot });
    }
    let mut checkpoint: Option<(usize, Vec<u8>)> = None;
    for (i, command) in plan.commands.iter().enumerate() {
        let ctx = plan.ctx(i);
        match history {
            History::FreshPerEntry if i > 0 => {
                let state = guest.snapshot()?;
                guest = open(runtime, module, plan.ctx(i - 1), Some(&state))?;
            }
            History::RestoredAfter(k) if i == *k => {
                let state = guest.snapshot()?;
                guest = open(runtime, module, plan.ctx(i - 1), Some(&state))?;
            }
            History::Recovered { at, from } if i == *at => {
                let (taken, state) = checkpoint
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("no checkpoint after entry {from}"))?;
                guest = open(runtime, module, plan.ctx(taken - 1), Some(&state))?;
                for j in taken..i {
                    let _ = guest.apply(plan.ctx(j), &plan.commands[j]);
                }
            }
            _ => {}
        }
        replies.push(guest.apply(ctx, command));
        if let History::Recovered { from, .. } = history
            && i + 1 == *from
        {
            checkpoint = Some((i + 1, guest.snapshot()?));
        }
        if *history == History::QueriesInterleaved {
            for q in queries {
                let _ = guest.query(q);
            }
        }
    }
    let snapshot = guest.snapshot();
    Ok(Run { replies, snapshot })
}
