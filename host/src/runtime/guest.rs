//! A live guest instance: the calls waft makes and the recovery that undoes a trapped call.

use super::bindings::Guest as Bindings;
use super::bindings::waft::fsm::types::{ApplyContext, Entry};
use super::config::{CheckpointPolicy, Limits};
use super::error::{GuestError, LoadError, TrapKind};
use super::module::{GuestModule, ModuleHash, root_message};
use super::wasi::{CallKind, HostState};
use std::sync::Arc;
use wasmtime::{Engine, Store, Trap};

/// Deterministic facts about a log entry, passed to the guest with its command.
pub type ApplyCtx = ApplyContext;

/// A guest's state in replayable form: restore `checkpoint` (or start fresh), then apply
/// `journal` in order. What a snapshot holds for a guest whose own `snapshot` fails.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayForm {
    /// The last snapshot the guest produced or restored, if any.
    #[serde(with = "serde_bytes")]
    pub checkpoint: Option<Vec<u8>>,
    /// The commands applied since, with their contexts.
    pub journal: Vec<ReplayEntry>,
}

/// One command of a [`ReplayForm`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayEntry {
    /// Log index.
    pub index: u64,
    /// Term of the leader that proposed it.
    pub term: u64,
    /// The entry's timestamp.
    pub timestamp_ms: u64,
    /// The command bytes.
    #[serde(with = "serde_bytes")]
    pub command: Vec<u8>,
}

/// An applied command kept for replay after a trap.
struct Journaled {
    ctx: ApplyContext,
    command: Vec<u8>,
}

/// One instance of a guest module together with what it needs to undo a trapped call.
///
/// Invariant: restoring `checkpoint` (or starting fresh when it is `None`) into a new instance
/// and applying `journal` in order gives exactly the state of the live instance.
pub struct Guest {
    module: Arc<GuestModule>,
    engine: Engine,
    limits: Limits,
    policy: CheckpointPolicy,
    label: Arc<str>,
    store: Store<HostState>,
    bindings: Bindings,
    checkpoint: Option<Arc<[u8]>>,
    journal: Vec<Journaled>,
    journal_bytes: usize,
    /// The last context applied: queries and snapshots see its time and index.
    last_ctx: ApplyContext,
    /// Fuel consumed by the most recent call (for metrics and benchmarks).
    last_fuel: u64,
    /// Fuel consumed by every call so far (metrics).
    fuel_total: u64,
    recoveries: u64,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("label", &self.label)
            .field("module", &self.module.hash())
            .field("journal", &self.journal.len())
            .finish_non_exhaustive()
    }
}

fn instantiate(
    engine: &Engine,
    module: &GuestModule,
    limits: &Limits,
    label: &Arc<str>,
) -> Result<(Store<HostState>, Bindings), LoadError> {
    let mut store = Store::new(
        engine,
        HostState::new(limits, module.hash().0, label.clone()),
    );
    store.limiter(|s| &mut s.limiter);
    // Start-up code (component initializers, cabi_realloc set-up) runs on this fuel too.
    store
        .set_fuel(limits.fuel_per_snapshot)
        .map_err(|e| LoadError::Instantiate(e.to_string()))?;
    let bindings = module
        .pre
        .instantiate(&mut store)
        .map_err(|e| LoadError::Instantiate(root_message(&e)))?;
    Ok((store, bindings))
}

impl Guest {
    pub(super) fn new(
        engine: Engine,
        module: Arc<GuestModule>,
        limits: Limits,
        policy: CheckpointPolicy,
        label: &str,
    ) -> Result<Guest, LoadError> {
        let label: Arc<str> = Arc::from(label);
        let (store, bindings) = instantiate(&engine, &module, &limits, &label)?;
        Ok(Guest {
            module,
            engine,
            limits,
            policy,
            label,
            store,
            bindings,
            checkpoint: None,
            journal: Vec::new(),
            journal_bytes: 0,
            last_ctx: ApplyContext {
                index: 0,
                term: 0,
                timestamp_ms: 0,
            },
            last_fuel: 0,
            fuel_total: 0,
            recoveries: 0,
        })
    }

    /// The module this instance runs.
    pub fn module(&self) -> &Arc<GuestModule> {
        &self.module
    }

    /// The module's identity.
    pub fn module_hash(&self) -> ModuleHash {
        self.module.hash()
    }

    /// Fuel consumed by the most recent call.
    pub fn last_fuel(&self) -> u64 {
        self.last_fuel
    }

    /// Fuel consumed by every call on this guest so far, replays included.
    pub fn fuel_total(&self) -> u64 {
        self.fuel_total
    }

    /// How many times this guest was rebuilt after a trap.
    pub fn recoveries(&self) -> u64 {
        self.recoveries
    }

    /// Applies one command. `Ok` is the guest's reply; see [`GuestError`] for the failures.
    /// After a trap the state is exactly as before the call.
    pub fn apply(&mut self, ctx: ApplyCtx, command: &[u8]) -> Result<Vec<u8>, GuestError> {
        let result = self.call_apply(ctx, command);
        match result {
            Err(e) if e.is_trap() => {
                self.recover()?;
                Err(e)
            }
            other => {
                self.record(ctx, command);
                other
            }
        }
    }

    /// Applies several entries in order, with the same outcome as calling [`Guest::apply`] on
    /// each: batching is only an optimization. Guests that read WASI clocks or randomness are
    /// applied one entry at a time, and a batch that traps is undone and re-applied one entry at
    /// a time, so fuel, traps and replies never depend on how entries were grouped.
    pub fn apply_batch(
        &mut self,
        entries: &[(ApplyCtx, &[u8])],
    ) -> Vec<Result<Vec<u8>, GuestError>> {
        if entries.len() < 2 || !self.module.info.can_batch() {
            return entries
                .iter()
                .map(|(ctx, cmd)| self.apply(*ctx, cmd))
                .collect();
        }
        match self.call_batch(entries) {
            Ok(results) => {
                for (ctx, cmd) in entries {
                    self.record(*ctx, cmd);
                }
                results
            }
            Err(e) => {
                if let Err(poisoned) = self.recover() {
                    return entries.iter().map(|_| Err(poisoned.clone())).collect();
                }
                tracing::debug!(service = %self.label, error = %e, "batch failed; applying its entries one by one");
                entries
                    .iter()
                    .map(|(ctx, cmd)| self.apply(*ctx, cmd))
                    .collect()
            }
        }
    }

    /// Answers a read-only query against the current state.
    pub fn query(&mut self, request: &[u8]) -> Result<Vec<u8>, GuestError> {
        let ctx = self.last_ctx;
        self.begin(CallKind::Query, ctx, self.limits.fuel_per_query);
        let raw = self
            .bindings
            .waft_fsm_state_machine()
            .call_query(&mut self.store, request);
        let result = self.finish(raw).and_then(|r| self.check_reply(r));
        if matches!(&result, Err(e) if e.is_trap()) {
            self.recover()?;
        }
        result
    }

    /// Serializes the guest's state. A successful snapshot also becomes the recovery
    /// checkpoint, since it describes the state exactly.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, GuestError> {
        let bytes = self.snapshot_inner()?;
        self.set_checkpoint(Arc::from(bytes.as_slice()));
        Ok(bytes)
    }

    /// The current state as checkpoint + journal, without calling the guest (so it works for a
    /// guest whose `snapshot` traps). [`Guest::replay`] turns it back into the same state.
    pub fn replay_form(&self) -> ReplayForm {
        ReplayForm {
            checkpoint: self.checkpoint.as_ref().map(|c| c.to_vec()),
            journal: self
                .journal
                .iter()
                .map(|j| ReplayEntry {
                    index: j.ctx.index,
                    term: j.ctx.term,
                    timestamp_ms: j.ctx.timestamp_ms,
                    command: j.command.clone(),
                })
                .collect(),
        }
    }

    /// Rebuilds the state a [`ReplayForm`] describes: restores its checkpoint, then applies its
    /// commands (which applied without trapping before, so they do again).
    pub fn replay(&mut self, form: &ReplayForm) -> Result<(), GuestError> {
        if let Some(checkpoint) = &form.checkpoint {
            self.restore(checkpoint)?;
        }
        for e in &form.journal {
            let ctx = ApplyContext {
                index: e.index,
                term: e.term,
                timestamp_ms: e.timestamp_ms,
            };
            if let Err(err) = self.apply(ctx, &e.command)
                && err.is_trap()
            {
                return Err(GuestError::Poisoned(format!(
                    "replaying entry {} trapped, though it applied before: {err}",
                    e.index
                )));
            }
        }
        Ok(())
    }

    /// Replaces the guest's state with a snapshot. On any failure (a rejection or a trap) the
    /// state is exactly as before.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), GuestError> {
        match self.call_restore(snapshot) {
            Ok(()) => {
                self.set_checkpoint(Arc::from(snapshot));
                Ok(())
            }
            Err(e) => {
                // Even a guest that answered `err` may have changed something before it gave
                // up: rebuild it so the old state is guaranteed, not merely promised.
                self.recover()?;
                Err(e)
            }
        }
    }

    fn snapshot_inner(&mut self) -> Result<Vec<u8>, GuestError> {
        let ctx = self.last_ctx;
        self.begin(CallKind::Snapshot, ctx, self.limits.fuel_per_snapshot);
        let raw = self
            .bindings
            .waft_fsm_state_machine()
            .call_snapshot(&mut self.store);
        match self.finish(raw.map(Ok)) {
            Ok(bytes) => Ok(bytes),
            Err(e) => {
                self.recover()?;
                Err(e)
            }
        }
    }

    fn call_restore(&mut self, snapshot: &[u8]) -> Result<(), GuestError> {
        let ctx = self.last_ctx;
        self.begin(CallKind::Restore, ctx, self.limits.fuel_per_snapshot);
        let raw = self
            .bindings
            .waft_fsm_state_machine()
            .call_restore(&mut self.store, snapshot);
        self.finish(raw)
    }

    fn call_apply(&mut self, ctx: ApplyContext, command: &[u8]) -> Result<Vec<u8>, GuestError> {
        self.last_ctx = ctx;
        self.begin(CallKind::Apply, ctx, self.limits.fuel_per_apply);
        let raw = self
            .bindings
            .waft_fsm_state_machine()
            .call_apply(&mut self.store, ctx, command);
        self.finish(raw).and_then(|r| self.check_reply(r))
    }

    /// One `apply-batch` call. Any failure (a trap, a reply over the cap, a result count that
    /// does not match) is returned as an error; the caller undoes the batch.
    fn call_batch(
        &mut self,
        entries: &[(ApplyCtx, &[u8])],
    ) -> Result<Vec<Result<Vec<u8>, GuestError>>, GuestError> {
        let batch: Vec<Entry> = entries
            .iter()
            .map(|(ctx, cmd)| Entry {
                context: *ctx,
                command: cmd.to_vec(),
            })
            .collect();
        let last = entries[entries.len() - 1].0;
        self.last_ctx = last;
        // The batch as a whole gets one entry's fuel: if it fits, every entry would have fit
        // alone; if not, the entries are re-applied one by one with their own fuel.
        self.begin(CallKind::Apply, last, self.limits.fuel_per_apply);
        let raw = self
            .bindings
            .waft_fsm_state_machine()
            .call_apply_batch(&mut self.store, &batch);
        let results = self.finish(raw.map(Ok))?;
        if results.len() != entries.len() {
            return Err(GuestError::Trap {
                kind: TrapKind::Other,
                detail: format!(
                    "apply-batch returned {} results for {} entries",
                    results.len(),
                    entries.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            out.push(match r {
                Ok(reply) => Ok(self.check_reply(reply)?),
                Err(msg) => Err(GuestError::Rejected(msg)),
            });
        }
        Ok(out)
    }

    fn begin(&mut self, kind: CallKind, ctx: ApplyContext, fuel: u64) {
        let reseed = self.module.info.uses_random;
        self.store
            .data()
            .call
            .begin(kind, ctx.index, ctx.timestamp_ms, reseed, &self.limits);
        self.store.data_mut().limiter.hit = None;
        // Fuel is enabled on the engine, so this cannot fail.
        let _ = self.store.set_fuel(fuel);
        self.last_fuel = fuel;
    }

    /// Turns the raw outcome of a call into ours, classifying traps.
    fn finish<T>(&mut self, raw: wasmtime::Result<Result<T, String>>) -> Result<T, GuestError> {
        let left = self.store.get_fuel().unwrap_or(0);
        self.last_fuel = self.last_fuel.saturating_sub(left);
        self.fuel_total = self.fuel_total.saturating_add(self.last_fuel);
        self.store.data().call.finish();
        match raw {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(msg)) => Err(GuestError::Rejected(msg)),
            Err(e) => {
                let stderr = self.store.data().call.stderr_tail();
                Err(self.classify(&e, &stderr))
            }
        }
    }

    fn classify(&mut self, e: &wasmtime::Error, stderr: &str) -> GuestError {
        let trap = e.downcast_ref::<Trap>().copied();
        let limit_hit = self.store.data_mut().limiter.hit.take();
        let said = explain_stderr(stderr);
        let (kind, detail) = match (limit_hit, trap) {
            (Some(why), _) => (TrapKind::OutOfMemory, why),
            (None, Some(Trap::OutOfFuel)) => (
                TrapKind::OutOfFuel,
                format!("the call used all of its fuel ({} units)", self.last_fuel),
            ),
            (None, Some(Trap::UnreachableCodeReached)) => match said.take_panic() {
                Some(panic) => {
                    return GuestError::Trap {
                        kind: TrapKind::Panic,
                        detail: panic,
                    };
                }
                None => (TrapKind::Panic, Trap::UnreachableCodeReached.to_string()),
            },
            (None, Some(other)) => (TrapKind::Other, other.to_string()),
            (None, None) => (TrapKind::Other, first_line(&root_message(e))),
        };
        let detail = match said.text() {
            Some(text) => format!("{detail} (stderr: {text})"),
            None => detail,
        };
        GuestError::Trap { kind, detail }
    }

    fn check_reply(&self, reply: Vec<u8>) -> Result<Vec<u8>, GuestError> {
        if reply.len() > self.limits.max_reply_bytes {
            return Err(GuestError::Trap {
                kind: TrapKind::ReplyTooLarge,
                detail: format!(
                    "reply of {} bytes is over the {}-byte limit",
                    reply.len(),
                    self.limits.max_reply_bytes
                ),
            });
        }
        Ok(reply)
    }

    /// Remembers an applied entry for replay, and checkpoints when the journal is long.
    fn record(&mut self, ctx: ApplyContext, command: &[u8]) {
        self.journal_bytes += command.len();
        self.journal.push(Journaled {
            ctx,
            command: command.to_vec(),
        });
        let checkpoint = self.checkpoint.as_ref().map_or(0, |c| c.len());
        if self
            .policy
            .due(self.journal.len(), self.journal_bytes, checkpoint)
        {
            match self.snapshot_inner() {
                Ok(bytes) => self.set_checkpoint(Arc::from(bytes)),
                Err(e) => tracing::warn!(
                    service = %self.label,
                    error = %e,
                    "could not checkpoint the guest; will retry after the next entry"
                ),
            }
        }
    }

    fn set_checkpoint(&mut self, bytes: Arc<[u8]>) {
        self.checkpoint = Some(bytes);
        self.journal.clear();
        self.journal_bytes = 0;
    }

    /// Replaces the (possibly trapped) instance with a fresh one holding the state described by
    /// the checkpoint and the journal.
    fn recover(&mut self) -> Result<(), GuestError> {
        self.recoveries += 1;
        let poisoned = |what: String| {
            tracing::error!(what, "guest recovery failed");
            GuestError::Poisoned(what)
        };
        let (store, bindings) = instantiate(&self.engine, &self.module, &self.limits, &self.label)
            .map_err(|e| poisoned(format!("cannot re-instantiate: {e}")))?;
        self.store = store;
        self.bindings = bindings;
        if let Some(checkpoint) = self.checkpoint.clone() {
            self.call_restore(&checkpoint)
                .map_err(|e| poisoned(format!("cannot restore the checkpoint: {e}")))?;
        }
        let journal = std::mem::take(&mut self.journal);
        let replayed =
            journal
                .iter()
                .try_for_each(|entry| match self.call_apply(entry.ctx, &entry.command) {
                    Err(e) if e.is_trap() => Err(poisoned(format!(
                        "replaying entry {} trapped, though it applied before: {e}",
                        entry.ctx.index
                    ))),
                    _ => Ok(()),
                });
        if let Some(last) = journal.last() {
            self.last_ctx = last.ctx;
        }
        self.journal = journal;
        replayed
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

/// What a trapped guest last wrote to stderr, boiled down to one line.
struct Stderr {
    lines: Vec<String>,
}

/// Keeps the meaningful lines of a stderr tail (Rust's "run with RUST_BACKTRACE" hint is not).
fn explain_stderr(stderr: &str) -> Stderr {
    Stderr {
        lines: stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .map(str::to_owned)
            .collect(),
    }
}

impl Stderr {
    /// A Rust panic ("thread '..' panicked at FILE:LINE:COL:" then the message) as
    /// "MESSAGE (at FILE:LINE:COL)".
    fn take_panic(&self) -> Option<String> {
        let at = self
            .lines
            .iter()
            .rposition(|l| l.contains("panicked at "))?;
        let header = &self.lines[at];
        let location =
            header[header.find("panicked at ")? + "panicked at ".len()..].trim_end_matches(':');
        let message = self.lines[at + 1..].join(" ");
        Some(if message.is_empty() {
            format!("panic at {location}")
        } else {
            format!("{message} (at {location})")
        })
    }

    fn text(&self) -> Option<String> {
        if self.lines.is_empty() {
            return None;
        }
        let start = self.lines.len().saturating_sub(3);
        Some(self.lines[start..].join(" / "))
    }
}
