//! A live guest instance: the calls waft makes and the recovery that undoes a trapped call.

use super::bindings::Bindings;
use super::bindings::v1::waft::fsm::types::ApplyContext;
use super::config::{CheckpointPolicy, Limits};
use super::effects::Effect;
use super::error::{GuestError, LoadError, OpenError, TrapKind};
use super::module::{GuestModule, ModuleHash, root_message};
use super::replay::{ApplyCtx, ReplayCall, ReplayEntry, ReplayForm};
use super::wasi::{CallKind, HostState};
use std::sync::Arc;
use wasmtime::{Engine, Store};

/// A call made on the live instance, kept for replay.
#[derive(Debug, Clone)]
enum Journaled {
    Apply {
        ctx: ApplyContext,
        command: Vec<u8>,
    },
    Snapshot {
        ctx: ApplyContext,
    },
    Fire {
        ctx: ApplyContext,
        key: String,
        payload: Vec<u8>,
    },
}

/// One instance of a guest module together with its history.
///
/// Invariant (the *instance history*): the live instance is exactly a fresh instance opened at
/// `opened_at` with `base` (see [`ReplayForm`]) on which the calls of `journal` were made, in
/// order. Every replica makes the same replicated calls at the same log indexes and opens a new
/// instance at the same points (deploys, rebases chosen by [`CheckpointPolicy`] from the journal
/// alone), so every replica's instance has the same history and reaches the same bytes, whatever
/// the guest keeps outside its snapshot. Calls that are not replicated ([`Guest::query`]) run on
/// the live instance and must change nothing; [`Guest::state`] and [`Guest::replay_form`] read
/// the state without calling the live instance at all.
pub struct Guest {
    module: Arc<GuestModule>,
    engine: Engine,
    limits: Limits,
    policy: CheckpointPolicy,
    label: Arc<str>,
    store: Store<HostState>,
    bindings: Bindings,
    opened_at: ApplyContext,
    base: Option<Arc<[u8]>>,
    journal: Vec<Journaled>,
    journal_bytes: usize,
    /// The last context applied: queries and snapshots see its time and index.
    last_ctx: ApplyContext,
    /// Fuel consumed by the most recent call (for metrics and benchmarks).
    last_fuel: u64,
    /// Fuel consumed by every call so far (metrics).
    fuel_total: u64,
    recoveries: u64,
    rebases: u64,
    /// Calls that hit a host fault (see `contain.rs`), replays included.
    host_faults: u64,
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

/// The context of an instance opened outside any log entry (`waft exec`, tests).
pub(super) const ZERO_CTX: ApplyContext = ApplyContext {
    index: 0,
    term: 0,
    timestamp_ms: 0,
};

/// A fresh instance whose start-up code sees the clock and randomness of `ctx`.
fn instantiate(
    engine: &Engine,
    module: &GuestModule,
    limits: &Limits,
    label: &Arc<str>,
    ctx: ApplyContext,
) -> Result<(Store<HostState>, Bindings), LoadError> {
    let mut store = Store::new(
        engine,
        HostState::new(limits, module.hash().0, label.clone()),
    );
    store.data().call.begin(
        CallKind::Instantiate,
        ctx.index,
        ctx.timestamp_ms,
        module.info.uses_random,
        limits,
    );
    store.limiter(|s| &mut s.limiter);
    // What a guest may hand the host in one call (a snapshot): wasmtime's default, 128 MiB,
    // made a guest whose state outgrew it unable to snapshot, so never to rebase, hot-swap or
    // back up. A guest cannot return more than its memory holds; the memory limit is
    // replicated with the service, so every replica allows the same.
    store.set_hostcall_fuel(limits.max_memory_bytes.max(128 << 20));
    // Start-up code (component initializers, cabi_realloc set-up) runs on this fuel too.
    store
        .set_fuel(limits.fuel_per_snapshot)
        .map_err(|e| LoadError::Instantiate(e.to_string()))?;
    let bindings = module
        .pre
        .instantiate(&mut store)
        .map_err(|e| LoadError::Instantiate(root_message(&e)))?;
    store.data().call.finish();
    Ok((store, bindings))
}

impl Guest {
    /// Opens a fresh instance at `ctx`: its start-up code, then `restore(base)` or, without a
    /// base, a warm-up `snapshot` call, run with `ctx`'s clock and randomness. The opening call
    /// is the instance's first: a language runtime that seeds something on its first call
    /// (componentize-py reseeds `random` there) seeds it identically on every replica, never
    /// from whichever local call (a query) happened to come first.
    pub(super) fn open(
        engine: Engine,
        module: Arc<GuestModule>,
        limits: Limits,
        policy: CheckpointPolicy,
        label: &str,
        ctx: ApplyContext,
        base: Option<Arc<[u8]>>,
    ) -> Result<Guest, OpenError> {
        let label: Arc<str> = Arc::from(label);
        let (store, bindings) = instantiate(&engine, &module, &limits, &label, ctx)?;
        let mut guest = Guest {
            module,
            engine,
            limits,
            policy,
            label,
            store,
            bindings,
            opened_at: ctx,
            base: None,
            journal: Vec::new(),
            journal_bytes: 0,
            last_ctx: ctx,
            last_fuel: 0,
            fuel_total: 0,
            recoveries: 0,
            rebases: 0,
            host_faults: 0,
        };
        guest.open_call(base.as_deref())?;
        guest.base = base;
        Ok(guest)
    }

    /// Rebuilds the guest a [`ReplayForm`] describes: opens it, then makes its calls verbatim
    /// (no checkpoint decisions: the form already records what happened).
    pub(super) fn from_replay(
        engine: Engine,
        module: Arc<GuestModule>,
        limits: Limits,
        policy: CheckpointPolicy,
        label: &str,
        form: &ReplayForm,
    ) -> Result<Guest, OpenError> {
        let base = form.base.as_deref().map(Arc::from);
        let mut guest = Guest::open(
            engine,
            module,
            limits,
            policy,
            label,
            form.opened_at.into(),
            base,
        )?;
        for e in &form.journal {
            let entry = match &e.call {
                ReplayCall::Apply(cmd) => Journaled::Apply {
                    ctx: e.at.into(),
                    command: cmd.to_vec(),
                },
                ReplayCall::Snapshot => Journaled::Snapshot { ctx: e.at.into() },
                ReplayCall::Fire { key, payload } => Journaled::Fire {
                    ctx: e.at.into(),
                    key: key.clone(),
                    payload: payload.clone(),
                },
            };
            guest.replay_one(&entry)?;
            guest.push(entry);
        }
        Ok(guest)
    }

    /// The opening call on a fresh instance (see [`Guest::open`]). A warm-up that traps leaves
    /// a new instance with no opening call, the same way on every replica.
    fn open_call(&mut self, base: Option<&[u8]>) -> Result<(), OpenError> {
        let ctx = self.opened_at;
        match base {
            Some(bytes) => {
                self.begin(CallKind::Open, ctx, self.limits.fuel_per_snapshot);
                let raw = self.bindings.restore(&mut self.store, bytes);
                self.finish(raw)?;
            }
            None => {
                self.begin(CallKind::Open, ctx, self.limits.fuel_per_snapshot);
                let raw = self.bindings.snapshot(&mut self.store);
                if self.finish(raw.map(Ok)).is_err() {
                    let (store, bindings) =
                        instantiate(&self.engine, &self.module, &self.limits, &self.label, ctx)?;
                    self.store = store;
                    self.bindings = bindings;
                }
            }
        }
        Ok(())
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

    /// Bytes of the instance's history this guest keeps to rebuild it (its base state and
    /// the journal of calls since; see [`CheckpointPolicy`] for when it is cut).
    pub fn history_bytes(&self) -> usize {
        self.base.as_ref().map_or(0, |b| b.len()) + self.journal_bytes
    }

    /// Linear memory the live instance holds, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limiter.memory_bytes
    }

    /// How many times this guest was rebuilt after a trap.
    pub fn recoveries(&self) -> u64 {
        self.recoveries
    }

    /// How many calls hit a host fault (contained as traps; see `runtime/contain.rs`).
    pub fn host_faults(&self) -> u64 {
        self.host_faults
    }

    /// How many times the instance was replaced by a fresh one restored from its own snapshot
    /// (see [`CheckpointPolicy`]).
    pub fn rebases(&self) -> u64 {
        self.rebases
    }

    /// Whether applying `entries` more commands of `bytes` bytes in all would make the
    /// checkpoint policy call for a rebase (which costs about a restore of the whole state).
    pub fn rebase_within(&self, entries: usize, bytes: usize) -> bool {
        let base = self.base.as_ref().map_or(0, |c| c.len());
        self.policy.due(
            self.journal.len() + entries,
            self.journal_bytes + bytes,
            base,
        )
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

    /// Applies one command and returns its effects too (timers, events: see [`Effect`]), for a
    /// guest that makes them. Effects count only when the guest answered `ok` and `check`
    /// accepts them; when `check` refuses (a cap on the service's pending timers, say) or the
    /// guest went over a per-call cap, the call is undone as if it trapped, and the answer is
    /// [`GuestError::Refused`]. A rejection keeps no effects.
    pub fn apply_effects(
        &mut self,
        ctx: ApplyCtx,
        command: &[u8],
        check: &mut dyn FnMut(&[Effect]) -> Result<(), String>,
    ) -> (Result<Vec<u8>, GuestError>, Vec<Effect>) {
        let result = self.call_apply(ctx, command);
        match result {
            Err(e) if e.is_trap() => {
                if let Err(poisoned) = self.recover() {
                    return (Err(poisoned), Vec::new());
                }
                (Err(e), Vec::new())
            }
            Err(rejected) => {
                self.record(ctx, command);
                (Err(rejected), Vec::new())
            }
            Ok(reply) => match self.take_effects(check) {
                Ok(effects) => {
                    self.record(ctx, command);
                    (Ok(reply), effects)
                }
                Err(refused) => (Err(refused), Vec::new()),
            },
        }
    }

    /// Delivers the timer `key` (a 0.2.0 guest's `fire`) and returns the call's effects, as
    /// [`Guest::apply_effects`] does. A 0.1.0 guest cannot take timers: `Refused`, nothing
    /// called.
    pub fn fire(
        &mut self,
        ctx: ApplyCtx,
        key: &str,
        payload: &[u8],
        check: &mut dyn FnMut(&[Effect]) -> Result<(), String>,
    ) -> (Result<(), GuestError>, Vec<Effect>) {
        if !self.module.info.fires_timers() {
            return (
                Err(GuestError::Refused(format!(
                    "the guest speaks {}, which has no timers",
                    self.module.info.fsm
                ))),
                Vec::new(),
            );
        }
        let journaled = Journaled::Fire {
            ctx,
            key: key.to_owned(),
            payload: payload.to_vec(),
        };
        match self.call_fire(ctx, key, payload) {
            Err(e) if e.is_trap() => {
                if let Err(poisoned) = self.recover() {
                    return (Err(poisoned), Vec::new());
                }
                (Err(e), Vec::new())
            }
            Err(rejected) => {
                self.push(journaled);
                (Err(rejected), Vec::new())
            }
            Ok(()) => match self.take_effects(check) {
                Ok(effects) => {
                    self.push(journaled);
                    (Ok(()), effects)
                }
                Err(refused) => (Err(refused), Vec::new()),
            },
        }
    }

    /// The effects of the call that just returned `ok`, if they are within the caps and
    /// `check` accepts them; otherwise the call is undone (the instance rebuilt from its
    /// history, which does not have the call yet) and the reason returned.
    fn take_effects(
        &mut self,
        check: &mut dyn FnMut(&[Effect]) -> Result<(), String>,
    ) -> Result<Vec<Effect>, GuestError> {
        let log = &mut self.store.data_mut().effects;
        let effects = std::mem::take(&mut log.list);
        let refused = match log.over.take() {
            Some(why) => Some(why),
            None => check(&effects).err(),
        };
        match refused {
            None => Ok(effects),
            Some(why) => {
                self.recover()?;
                Err(GuestError::Refused(why))
            }
        }
    }

    fn call_fire(
        &mut self,
        ctx: ApplyContext,
        key: &str,
        payload: &[u8],
    ) -> Result<(), GuestError> {
        self.last_ctx = ctx;
        self.begin(CallKind::Apply, ctx, self.limits.fuel_per_apply);
        let raw = self
            .bindings
            .fire(&mut self.store, ctx, key, payload)
            .unwrap_or_else(|| Ok(Err("the guest has no fire export".to_owned())));
        self.finish(raw)
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

    /// Answers a read-only query against the current state. Queries are not replicated: the
    /// guest must not change anything, not even state it never serializes (the verifier,
    /// `waft exec --verify`, checks it).
    pub fn query(&mut self, request: &[u8]) -> Result<Vec<u8>, GuestError> {
        let ctx = self.last_ctx;
        self.begin(CallKind::Query, ctx, self.limits.fuel_per_query);
        let raw = self.bindings.query(&mut self.store, request);
        let result = self.finish(raw).and_then(|r| self.check_reply(r));
        if matches!(&result, Err(e) if e.is_trap()) {
            self.recover()?;
        }
        result
    }

    /// Serializes the guest's state by asking the live instance: a replicated call (every
    /// replica makes it at the same index: an audit, a deploy), recorded in the history.
    /// To read the state for a local purpose use [`Guest::state`].
    pub fn snapshot(&mut self) -> Result<Vec<u8>, GuestError> {
        let bytes = self.call_snapshot()?;
        self.push(Journaled::Snapshot { ctx: self.last_ctx });
        Ok(bytes)
    }

    /// The current state as the guest serializes it, without calling the live instance (so
    /// reading it on one replica changes nothing there): the base when nothing happened since
    /// the instance was opened, else a throwaway copy rebuilt from the history.
    pub fn state(&self) -> Result<Vec<u8>, GuestError> {
        if self.journal.is_empty()
            && let Some(base) = &self.base
        {
            return Ok(base.to_vec());
        }
        let mut copy = Guest::from_replay(
            self.engine.clone(),
            self.module.clone(),
            self.limits.clone(),
            self.policy.clone(),
            &self.label,
            &self.replay_form(),
        )?;
        copy.call_snapshot()
    }

    /// The guest's history (see [`ReplayForm`]), without calling the guest: what snapshots and
    /// backups carry.
    pub fn replay_form(&self) -> ReplayForm {
        ReplayForm {
            opened_at: self.opened_at.into(),
            base: self.base.as_ref().map(|c| c.to_vec()),
            journal: self
                .journal
                .iter()
                .map(|j| match j {
                    Journaled::Apply { ctx, command } => ReplayEntry {
                        at: (*ctx).into(),
                        call: ReplayCall::Apply(serde_bytes::ByteBuf::from(command.clone())),
                    },
                    Journaled::Snapshot { ctx } => ReplayEntry {
                        at: (*ctx).into(),
                        call: ReplayCall::Snapshot,
                    },
                    Journaled::Fire { ctx, key, payload } => ReplayEntry {
                        at: (*ctx).into(),
                        call: ReplayCall::Fire {
                            key: key.clone(),
                            payload: payload.clone(),
                        },
                    },
                })
                .collect(),
        }
    }

    /// Replaces the guest's state with a snapshot, in a fresh instance opened at the last
    /// applied context (so nothing of the old instance survives). On any failure (a rejection
    /// or a trap) the old instance stays, exactly as it was.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), GuestError> {
        let fresh = self.reopen(Arc::from(snapshot))?;
        self.take_instance(fresh);
        Ok(())
    }

    /// A fresh instance of this guest's module opened with `base` at the last applied context.
    fn reopen(&self, base: Arc<[u8]>) -> Result<Guest, OpenError> {
        Guest::open(
            self.engine.clone(),
            self.module.clone(),
            self.limits.clone(),
            self.policy.clone(),
            &self.label,
            self.last_ctx,
            Some(base),
        )
    }

    /// Moves `fresh`'s instance and history into `self`, keeping counters.
    fn take_instance(&mut self, fresh: Guest) {
        self.store = fresh.store;
        self.bindings = fresh.bindings;
        self.opened_at = fresh.opened_at;
        self.base = fresh.base;
        self.journal = fresh.journal;
        self.journal_bytes = fresh.journal_bytes;
        self.last_ctx = fresh.last_ctx;
        self.fuel_total = self.fuel_total.saturating_add(fresh.fuel_total);
        self.host_faults += fresh.host_faults;
    }

    fn call_snapshot(&mut self) -> Result<Vec<u8>, GuestError> {
        let ctx = self.last_ctx;
        self.begin(CallKind::Snapshot, ctx, self.limits.fuel_per_snapshot);
        let raw = self.bindings.snapshot(&mut self.store);
        match self.finish(raw.map(Ok)) {
            Ok(bytes) => Ok(bytes),
            Err(e) => {
                self.recover()?;
                Err(e)
            }
        }
    }

    fn call_apply(&mut self, ctx: ApplyContext, command: &[u8]) -> Result<Vec<u8>, GuestError> {
        self.last_ctx = ctx;
        self.begin(CallKind::Apply, ctx, self.limits.fuel_per_apply);
        let raw = self.bindings.apply(&mut self.store, ctx, command);
        self.finish(raw).and_then(|r| self.check_reply(r))
    }

    /// One `apply-batch` call. Any failure (a trap, a reply over the cap, a result count that
    /// does not match) is returned as an error; the caller undoes the batch.
    fn call_batch(
        &mut self,
        entries: &[(ApplyCtx, &[u8])],
    ) -> Result<Vec<Result<Vec<u8>, GuestError>>, GuestError> {
        let last = entries[entries.len() - 1].0;
        self.last_ctx = last;
        // The batch as a whole gets one entry's fuel: if it fits, every entry would have fit
        // alone; if not, the entries are re-applied one by one with their own fuel.
        self.begin(CallKind::Apply, last, self.limits.fuel_per_apply);
        let raw = self.bindings.apply_batch(&mut self.store, entries);
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
        self.store.data_mut().effects.clear();
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
        let limit_hit = self.store.data_mut().limiter.hit.take();
        let (error, host_fault) = super::trap::classify(e, stderr, limit_hit, self.last_fuel);
        if host_fault {
            self.host_faults += 1;
        }
        error
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

    fn push(&mut self, entry: Journaled) {
        match &entry {
            Journaled::Apply { command, .. } => self.journal_bytes += command.len(),
            Journaled::Fire { key, payload, .. } => self.journal_bytes += key.len() + payload.len(),
            Journaled::Snapshot { .. } => {}
        }
        self.journal.push(entry);
    }

    /// Remembers an applied entry, and rebases when the policy says the journal is long.
    fn record(&mut self, ctx: ApplyContext, command: &[u8]) {
        self.push(Journaled::Apply {
            ctx,
            command: command.to_vec(),
        });
        let base = self.base.as_ref().map_or(0, |c| c.len());
        let len = self.journal.len();
        if !self.policy.due(len, self.journal_bytes, base) {
            return;
        }
        // The first entry the policy calls for a rebase tries it; when that failed (a guest
        // whose snapshot traps), it is tried again only at powers of two, not after every
        // entry: each try costs a whole snapshot. The rule reads only the journal, which
        // every replica (and every snapshot) has alike, so every replica tries at the same
        // entries.
        let was_due = self
            .policy
            .due(len - 1, self.journal_bytes - command.len(), base);
        if !was_due || len.is_power_of_two() {
            self.rebase();
        }
    }

    /// Replaces the instance with a fresh one restored from its own snapshot, at the context
    /// of the entry just applied. Every replica does it at the same entry (the decision reads
    /// only the journal), so instance histories stay equal; it also bounds the journal.
    /// If the guest cannot snapshot or restore, the old instance carries on (the same way
    /// everywhere) and the next entry tries again.
    fn rebase(&mut self) {
        let bytes = match self.call_snapshot() {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(service = %self.label, error = %e,
                    "could not snapshot the guest to rebase it; will try again when its journal has doubled");
                return;
            }
        };
        match self.reopen(Arc::from(bytes)) {
            Ok(fresh) => {
                self.take_instance(fresh);
                self.rebases += 1;
            }
            Err(e) => {
                self.push(Journaled::Snapshot { ctx: self.last_ctx });
                tracing::warn!(service = %self.label, error = %e,
                    "a fresh instance refused the guest's own snapshot; the old instance carries on");
            }
        }
    }

    /// Makes one journaled call again (recovery, replay). A trap here means the history does
    /// not rebuild, which only a nondeterministic host could cause.
    fn replay_one(&mut self, entry: &Journaled) -> Result<(), GuestError> {
        let poisoned = |what: String| {
            tracing::error!(what, "guest recovery failed");
            GuestError::Poisoned(what)
        };
        match entry {
            Journaled::Apply { ctx, command } => match self.call_apply(*ctx, command) {
                Err(e) if e.is_trap() => Err(poisoned(format!(
                    "replaying entry {} trapped, though it applied before: {e}",
                    ctx.index
                ))),
                _ => Ok(()),
            },
            Journaled::Snapshot { ctx } => {
                self.last_ctx = *ctx;
                self.begin(CallKind::Snapshot, *ctx, self.limits.fuel_per_snapshot);
                let raw = self.bindings.snapshot(&mut self.store);
                self.finish(raw.map(Ok)).map(drop).map_err(|e| {
                    poisoned(format!(
                        "replaying the snapshot call at entry {} trapped, though it worked before: {e}",
                        ctx.index
                    ))
                })
            }
            Journaled::Fire { ctx, key, payload } => match self.call_fire(*ctx, key, payload) {
                Err(e) if e.is_trap() => Err(poisoned(format!(
                    "replaying timer {key:?} at entry {} trapped, though it fired before: {e}",
                    ctx.index
                ))),
                _ => Ok(()),
            },
        }
    }

    /// Replaces the (possibly trapped) instance with a fresh one with the same history.
    fn recover(&mut self) -> Result<(), GuestError> {
        self.recoveries += 1;
        let poisoned = |what: String| {
            tracing::error!(what, "guest recovery failed");
            GuestError::Poisoned(what)
        };
        let (store, bindings) = instantiate(
            &self.engine,
            &self.module,
            &self.limits,
            &self.label,
            self.opened_at,
        )
        .map_err(|e| poisoned(format!("cannot re-instantiate: {e}")))?;
        self.store = store;
        self.bindings = bindings;
        let base = self.base.clone();
        self.open_call(base.as_deref())
            .map_err(|e| poisoned(format!("cannot reopen the instance: {e}")))?;
        let journal = std::mem::take(&mut self.journal);
        let replayed = journal.iter().try_for_each(|entry| self.replay_one(entry));
        if let Some(
            Journaled::Apply { ctx, .. }
            | Journaled::Snapshot { ctx }
            | Journaled::Fire { ctx, .. },
        ) = journal.last()
        {
            self.last_ctx = *ctx;
        } else {
            self.last_ctx = self.opened_at;
        }
        self.journal = journal;
        replayed
    }
}
