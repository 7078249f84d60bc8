//! `waft check` and `waft exec`: working with a guest locally, without a cluster.

use super::LimitArgs;
use crate::runtime::{ApplyCtx, Guest, GuestError, Runtime, RuntimeConfig};
use anyhow::{Context, bail};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `waft check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The guest component (`.wasm`).
    pub file: PathBuf,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// Where `check` and `exec` keep compiled components, so that a large guest (Python,
/// JavaScript) compiles once, not on every run.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Keep compiled components here (default: $XDG_CACHE_HOME/waft, or ~/.cache/waft).
    #[arg(long, value_name = "DIR", env = "WAFT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile afresh and keep nothing.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
}

impl CacheArgs {
    /// The cache directory to use, if any.
    fn dir(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        self.cache_dir.clone().or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(base.join("waft"))
        })
    }
}

/// How `--commands-file` holds its commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CommandsFormat {
    /// One command per line, as text (empty lines skipped).
    Lines,
    /// One command per line, in hex (for binary commands; empty lines skipped).
    Hex,
    /// Each command as a 4-byte big-endian length, then that many bytes.
    LengthPrefixed,
}

/// Arguments of `waft exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The guest component (`.wasm`).
    pub file: PathBuf,
    /// Commands to apply, in order (each one is the payload bytes, as given).
    pub commands: Vec<String>,
    /// A query to run after the commands (repeatable).
    #[arg(long = "query", short = 'q', value_name = "QUERY")]
    pub queries: Vec<String>,
    /// After the commands, snapshot the state, restore it into a fresh instance and check that
    /// the new instance snapshots to the same bytes (and answers the queries the same way).
    #[arg(long)]
    pub snapshot_roundtrip: bool,
    /// Apply all commands in one `apply-batch` call instead of one `apply` each.
    #[arg(long)]
    pub batch: bool,
    /// Read more commands from this file (after those given as arguments); see
    /// --commands-format.
    #[arg(long, value_name = "FILE")]
    pub commands_file: Option<PathBuf>,
    /// How --commands-file holds its commands.
    #[arg(long, value_enum, default_value_t = CommandsFormat::Lines, requires = "commands_file")]
    pub commands_format: CommandsFormat,
    /// Check determinism: run the commands through several histories of the guest (one
    /// instance throughout; fresh instances restored from snapshots taken at several points; a
    /// fresh instance per entry; a trap-recovery replay; the queries run after every entry;
    /// one apply-batch call) and compare every reply and the final snapshot. Names the first
    /// entry and history that differ; exits non-zero if any does.
    #[arg(long)]
    pub verify: bool,
    /// The leader timestamp the commands carry (milliseconds since the Unix epoch).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub timestamp_ms: u64,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
}

fn read_module(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn runtime(limits: &LimitArgs, cache: &CacheArgs) -> anyhow::Result<Runtime> {
    Ok(Runtime::new(RuntimeConfig {
        limits: limits.limits(),
        cache_dir: cache.dir(),
        ..RuntimeConfig::default()
    })?)
}

/// Prints a reply as text when it is UTF-8, as hex otherwise.
fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("0x{}", hex::encode(bytes)),
    }
}

/// `waft check FILE`.
pub fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let bytes = read_module(&args.file)?;
    let runtime = runtime(&args.limits, &args.cache)?;
    let name = args.file.display();
    let module = runtime
        .load(&bytes)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let info = module.info();
    let mut out = std::io::stdout().lock();
    writeln!(out, "file:      {name} ({} bytes)", info.size)?;
    writeln!(out, "sha256:    {}", info.hash)?;
    writeln!(
        out,
        "world:     exports {} ({})",
        info.fsm.export(),
        match info.fsm {
            crate::runtime::FsmVersion::V0_1 => "commands",
            crate::runtime::FsmVersion::V0_2 => "commands, timers, events",
        }
    )?;
    writeln!(
        out,
        "compile:   {:.1} ms{}",
        info.load_time.as_secs_f64() * 1e3,
        if info.from_disk_cache {
            " (loaded from the cache of compiled guests)"
        } else {
            ""
        }
    )?;
    writeln!(out, "engine:    {}", runtime.fingerprint())?;
    writeln!(
        out,
        "imports:{}",
        if info.imports.is_empty() {
            "   none"
        } else {
            ""
        }
    )?;
    for import in &info.imports {
        let note = if import.starts_with("waft:fsm/host") {
            "waft host: logging"
        } else if import.starts_with("waft:fsm/timers") {
            "waft timers: replicated, delivered through fire"
        } else if import.starts_with("waft:fsm/events") {
            "waft events: replicated, streamed by Watch"
        } else if import.starts_with("waft:fsm/types") {
            "waft types"
        } else if import.starts_with("wasi:clocks/") {
            "deterministic: reads the entry's timestamp"
        } else if import.starts_with("wasi:random/") {
            "deterministic: seeded from module hash and log index"
        } else if import.starts_with("wasi:filesystem/") {
            "linked with no directories"
        } else if import.starts_with("wasi:cli/environment") {
            "empty environment and arguments"
        } else if import.starts_with("wasi:cli/std") {
            "stdin empty; stdout/stderr to the host log"
        } else {
            "provided"
        };
        writeln!(out, "  {import:<42} {note}")?;
    }
    writeln!(
        out,
        "batching:  {}",
        if info.can_batch() {
            "yes (no clock, random, timer or event imports)"
        } else if info.uses_effects {
            "no (sets timers or emits events, so entries are applied one at a time)"
        } else {
            "no (reads WASI clocks or randomness, so entries are applied one at a time)"
        }
    )?;
    for line in determinism_notes(&bytes) {
        writeln!(out, "{line}")?;
    }
    // Prove the guest runs: instantiate, snapshot the empty state, restore it, snapshot again.
    let started = Instant::now();
    let mut guest = runtime
        .instantiate(&module, "check")
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let instantiate = started.elapsed();
    let empty = guest
        .snapshot()
        .map_err(|e| anyhow::anyhow!("{name}: snapshot of the empty state failed: {e}"))?;
    guest
        .restore(&empty)
        .map_err(|e| anyhow::anyhow!("{name}: restoring its own empty snapshot failed: {e}"))?;
    writeln!(
        out,
        "instance:  {:.2} ms to instantiate; empty snapshot {} bytes, restores cleanly",
        instantiate.as_secs_f64() * 1e3,
        empty.len()
    )?;
    writeln!(out, "verdict:   OK: waft can run this guest")?;
    Ok(ExitCode::SUCCESS)
}

/// The commands of `waft exec`: the arguments, then the lines of `--commands-file`.
fn exec_commands(args: &ExecArgs) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut commands: Vec<Vec<u8>> = args
        .commands
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    if let Some(path) = &args.commands_file {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        commands.extend(
            read_commands(&bytes, args.commands_format)
                .with_context(|| format!("{}", path.display()))?,
        );
    }
    Ok(commands)
}

/// The commands of a commands file in `format`.
fn read_commands(bytes: &[u8], format: CommandsFormat) -> anyhow::Result<Vec<Vec<u8>>> {
    let lines = || {
        bytes
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
    };
    match format {
        CommandsFormat::Lines => Ok(lines().map(|(_, l)| l.to_vec()).collect()),
        CommandsFormat::Hex => lines()
            .map(|(n, l)| {
                let text = std::str::from_utf8(l).unwrap_or_default().trim();
                hex::decode(text.strip_prefix("0x").unwrap_or(text))
                    .with_context(|| format!("line {}: not hex", n + 1))
            })
            .collect(),
        CommandsFormat::LengthPrefixed => {
            let mut out = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    bail!(
                        "command {}: a length needs 4 bytes, {} left",
                        out.len() + 1,
                        rest.len()
                    );
                };
                let len = u32::from_be_bytes(*len) as usize;
                if tail.len() < len {
                    bail!(
                        "command {}: {len} bytes announced, {} left",
                        out.len() + 1,
                        tail.len()
                    );
                }
                out.push(tail[..len].to_vec());
                rest = &tail[len..];
            }
            Ok(out)
        }
    }
}

/// The marker `examples/guests/helpers/python/waft_det.py` leaves in a component.
const PYTHON_HELPER_MARKER: &[u8] = b"waft-determinism-helper:python:1";

/// What `waft check` says about determinism, by the language runtime found in the component.
fn determinism_notes(bytes: &[u8]) -> Vec<String> {
    let has = |needle: &[u8]| memchr::memmem::find(bytes, needle).is_some();
    if has(b"componentize_py_runtime") {
        let mut notes = vec!["language:  Python (componentize-py)".to_owned()];
        if has(PYTHON_HELPER_MARKER) {
            notes.push(
                "determinism: waft_det helper found: `random` and unseeded random.Random() are \
                 reseeded for every call; clocks, os.urandom, secrets, uuid4 and hash() are \
                 deterministic"
                    .to_owned(),
            );
        } else {
            notes.push(
                "determinism: WARNING: no waft_det helper: `random`'s own generator (and a \
                 random.Random() made at import time) is seeded once per instance, so the \
                 values it gives depend on when the instance was opened. Replicas still agree, \
                 but `waft exec --verify` will report it. Decorate the exported class with \
                 waft_det.deterministic (examples/guests/helpers/python, docs/guests.md)"
                    .to_owned(),
            );
        }
        notes
    } else if has(b"StarlingMonkey") {
        vec![
            "language:  JavaScript (ComponentizeJS / StarlingMonkey)".to_owned(),
            "determinism: Math.random, crypto.getRandomValues, Date.now and performance.now \
             are deterministic per entry without a helper"
                .to_owned(),
        ]
    } else {
        Vec::new()
    }
}

/// `waft exec FILE --verify`: the determinism verifier.
fn exec_verify(args: &ExecArgs, bytes: &[u8]) -> anyhow::Result<ExitCode> {
    // Instances never rebase by themselves here: "one instance throughout" must be one.
    let runtime = Runtime::new(RuntimeConfig {
        limits: args.limits.limits(),
        checkpoints: crate::runtime::CheckpointPolicy {
            entries: usize::MAX,
            bytes: usize::MAX,
        },
        cache_dir: args.cache.dir(),
        ..RuntimeConfig::default()
    })?;
    let name = args.file.display();
    let module = runtime
        .load(bytes)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let plan = crate::verify::Plan {
        commands: exec_commands(args)?,
        queries: args.queries.iter().map(|q| q.as_bytes().to_vec()).collect(),
        timestamp_ms: args.timestamp_ms,
    };
    if plan.commands.is_empty() {
        bail!("--verify needs commands (as arguments or with --commands-file)");
    }
    let report = crate::verify::verify(&runtime, &module, &plan)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "verified {} command(s) through {} histories:",
        plan.commands.len(),
        report.histories.len()
    )?;
    for h in &report.histories {
        writeln!(out, "  - {h}")?;
    }
    if report.ok() {
        writeln!(
            out,
            "deterministic: every history gave the same replies and snapshot"
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "NOT DETERMINISTIC:")?;
    for f in &report.findings {
        writeln!(out, "  {f}")?;
    }
    Ok(ExitCode::FAILURE)
}

/// `waft exec FILE CMD...`.
pub fn exec(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let bytes = read_module(&args.file)?;
    if args.verify {
        return exec_verify(args, &bytes);
    }
    let runtime = runtime(&args.limits, &args.cache)?;
    let name = args.file.display();
    let module = runtime
        .load(&bytes)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let mut guest = runtime
        .instantiate(&module, "exec")
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let commands = exec_commands(args)?;
    let mut out = std::io::stdout().lock();
    let mut failures = 0usize;
    let mut report = |out: &mut std::io::StdoutLock<'_>,
                      result: Result<Vec<u8>, GuestError>|
     -> std::io::Result<()> {
        match result {
            Ok(reply) => {
                let text = show(&reply);
                // Multi-line replies (a scan) already end with a newline.
                if text.ends_with('\n') {
                    write!(out, "{text}")
                } else {
                    writeln!(out, "{text}")
                }
            }
            Err(e) => {
                failures += 1;
                writeln!(out, "error: {e}")
            }
        }
    };
    let entries: Vec<(ApplyCtx, &[u8])> = commands
        .iter()
        .enumerate()
        .map(|(i, cmd)| {
            let ctx = ApplyCtx {
                index: i as u64 + 1,
                term: 1,
                timestamp_ms: args.timestamp_ms,
            };
            (ctx, cmd.as_slice())
        })
        .collect();
    if args.batch {
        for result in guest.apply_batch(&entries) {
            report(&mut out, result)?;
        }
    } else {
        for (ctx, cmd) in &entries {
            report(&mut out, guest.apply(*ctx, cmd))?;
        }
    }
    for q in &args.queries {
        report(&mut out, guest.query(q.as_bytes()))?;
    }
    if args.snapshot_roundtrip {
        roundtrip(&runtime, &module, &mut guest, &args.queries)
            .map_err(|e| anyhow::anyhow!("{name}: snapshot round trip failed: {e}"))?;
        writeln!(out, "snapshot round trip: OK")?;
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Snapshot → restore into a fresh instance → snapshot: the bytes and query answers must match.
fn roundtrip(
    runtime: &Runtime,
    module: &std::sync::Arc<crate::runtime::GuestModule>,
    guest: &mut Guest,
    queries: &[String],
) -> anyhow::Result<()> {
    let first = guest.snapshot()?;
    let mut fresh = runtime.instantiate(module, "exec-roundtrip")?;
    fresh.restore(&first)?;
    let second = fresh.snapshot()?;
    if first != second {
        bail!(
            "the restored instance snapshots to different bytes ({} vs {} bytes): \
             snapshot is not canonical or restore loses state",
            first.len(),
            second.len()
        );
    }
    for q in queries {
        let (a, b) = (guest.query(q.as_bytes()), fresh.query(q.as_bytes()));
        if a != b {
            bail!("query {q:?} answers differently after restore: {a:?} vs {b:?}");
        }
    }
    Ok(())
}
