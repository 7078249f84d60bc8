//! Applying committed entries: commands (batched per service), exactly-once sessions,
//! deploys, rollbacks, restores, audits; one response per entry, events for watchers.

use crate::runtime::ApplyCtx;
use crate::storage::events::{Event, Outcome};
use crate::storage::snapshot::Session;
use crate::types::{ClientSeq, Entry, Request, Response, StoredMembership, TypeConfig};

use super::timers::Emitted;

/// What an entry carries.
type Payload = openraft::alias::EntryPayloadOf<TypeConfig>;
use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::vote::RaftLeaderId;
use std::io;
use std::sync::Arc;

use super::{
    APPLY_BUCKETS_US, Applied, Env, HealPlan, MAX_SESSIONS, Replicated, ServiceStats, SmState,
    failure, guest_response,
};

/// Commands read and not yet applied: consecutive commands for one service, applied as one
/// batch.
#[derive(Default)]
struct Batch {
    service: String,
    commands: Vec<(ApplyCtx, Vec<u8>, Option<ClientSeq>)>,
}

impl SmState {
    /// Applies committed entries in order and returns one response per entry.
    ///
    /// Fails, stopping the node (openraft treats the error as fatal), when carrying on could
    /// make this replica diverge or lose what it applied: a deploy validated by an engine with
    /// another fingerprint, or a module the store cannot read or write while a deploy, rollback
    /// or restore is applied (a full or failing disk). Everything a guest does is an answer,
    /// never an error here.
    ///
    /// Stops after an audit's votes entry that leaves this replica in the minority: the
    /// entries after it are returned with the heal to run first (see [`heal`]).
    pub(super) fn apply_entries(&mut self, entries: Vec<Entry>) -> io::Result<Applied> {
        let Some(first) = entries.first() else {
            return Ok((Vec::new(), None));
        };
        let first = first.log_id().index();
        let (out, heal) = self.apply_all(entries)?;
        let last = self.rep.last_applied.map_or(first, |l| l.index());
        let events = std::mem::take(&mut self.local.seen.pending_events);
        self.local.events.record(first..=last, events);
        Ok((out, heal))
    }

    /// Applies `entries`: every entry but an audit's is the replicated state's to apply
    /// ([`Replicated::apply_command`], [`Replicated::apply_other`]), with nothing of this
    /// node but its [`Env`]; audit entries compare that state's digest with the others'
    /// (`audit.rs`).
    pub(super) fn apply_all(&mut self, entries: Vec<Entry>) -> io::Result<Applied> {
        let mut out = Vec::with_capacity(entries.len());
        let mut batch = Batch::default();
        let mut entries = entries.into_iter();
        while let Some(entry) = entries.next() {
            let log_id = entry.log_id();
            let fault = self.local.inject_panic_at.clone();
            let (rep, mut env) = self.split();
            env.seen.applying = (log_id.index(), None);
            #[cfg(test)]
            super::fault::tests::maybe_panic(log_id.index());
            // A deploy written by an earlier release, with its module inline, applies as one
            // that names its module (which joins the store first).
            match rep.store_inline(&mut env, entry.payload)? {
                EntryPayload::Normal(Request::Command {
                    service,
                    payload,
                    client,
                    timestamp_ms,
                }) => {
                    if fault.as_deref() == Some(payload.as_slice()) {
                        env.seen.applying.1 = Some(service.as_str().into());
                        panic!("a fault injected by --inject-apply-panic");
                    }
                    let command = (service, payload, client, timestamp_ms);
                    rep.apply_command(&mut env, log_id, command, &mut batch, &mut out);
                }
                EntryPayload::Normal(
                    audit @ (Request::Audit { .. }
                    | Request::AuditReport { .. }
                    | Request::AuditVotes { .. }),
                ) => {
                    rep.flush(&mut env, &mut batch, &mut out);
                    if let Some(plan) = self.apply_audit(log_id, audit, &mut out)? {
                        return Ok((out, Some((plan, entries.collect()))));
                    }
                }
                other => {
                    rep.flush(&mut env, &mut batch, &mut out);
                    rep.apply_other(&mut env, log_id, other, &mut out)?;
                    if matches!(out.last(), Some(Response::Restored(_))) {
                        // Every service's state was replaced: watchers read it afresh.
                        self.local.seen.pending_events.clear();
                        self.local.events.reset(log_id.index());
                    }
                }
            }
            self.rep.last_applied = Some(log_id);
        }
        let (rep, mut env) = self.split();
        rep.flush(&mut env, &mut batch, &mut out);
        Ok((out, None))
    }

    /// Applies an audit's entry: this replica's digest of the replicated state, the leader's
    /// report checked against it, or the votes. Returns the heal plan when the votes leave
    /// this replica in the minority.
    fn apply_audit(
        &mut self,
        log_id: crate::types::LogId,
        audit: Request,
        out: &mut Vec<Response>,
    ) -> io::Result<Option<HealPlan>> {
        match audit {
            Request::Audit { timestamp_ms } => {
                self.rep.advance_clock(timestamp_ms);
                out.push(Response::Audited(self.record_digest(log_id.index())?));
            }
            Request::AuditReport { digest } => {
                self.check_report(&digest);
                out.push(Response::Empty);
            }
            Request::AuditVotes {
                index,
                proposer,
                votes,
            } => {
                out.push(Response::Empty);
                self.rep.last_applied = Some(log_id);
                return Ok(self.check_votes(log_id.index(), index, proposer, &votes));
            }
            other => unreachable!("not an audit's entry: {other:?}"),
        }
        Ok(None)
    }

    /// Whether `entries` are quick to apply: commands only (and blank or membership entries),
    /// to services that have applied at least [`MEASURED`] entries, whose average time per
    /// entry so far adds up to at most `budget_us` over the batch, and none of which would
    /// rebase on the way. Reads only local measurements: it decides where the entries are
    /// applied, never what applying them does.
    pub(super) fn cheap_to_apply(&self, entries: &[Entry], budget_us: u64) -> bool {
        /// Entries a service must have applied before its average is trusted.
        const MEASURED: u64 = 64;
        let mut spent = 0u64;
        let mut per_service: Vec<(&str, usize, usize)> = Vec::new();
        for entry in entries {
            match &entry.payload {
                EntryPayload::Blank | EntryPayload::Membership(_) => {}
                EntryPayload::Normal(Request::Command {
                    service, payload, ..
                }) => {
                    let Some(stats) = self.local.seen.stats.get(service.as_str()) else {
                        return false;
                    };
                    let n = stats.applied + stats.rejected + stats.trapped;
                    if n < MEASURED {
                        return false;
                    }
                    spent += stats.latency_sum_us / n + 1;
                    if spent > budget_us {
                        return false;
                    }
                    match per_service.iter_mut().find(|(s, _, _)| *s == service) {
                        Some((_, count, bytes)) => {
                            *count += 1;
                            *bytes += payload.len();
                        }
                        None => per_service.push((service, 1, payload.len())),
                    }
                }
                EntryPayload::Normal(_) => return false,
            }
        }
        per_service.iter().all(|(service, count, bytes)| {
            self.rep
                .services
                .get(*service)
                .is_some_and(|svc| !svc.guest.rebase_within(*count, *bytes))
        })
    }
}

impl Replicated {
    /// Applies a command at `log_id`: answered from its client's session if it is a retry,
    /// else queued in `batch` (which goes to the guest when the next entry is not a command
    /// for the same service, or repeats a client's session).
    fn apply_command(
        &mut self,
        env: &mut Env<'_>,
        log_id: crate::types::LogId,
        (service, payload, client, timestamp_ms): (String, Vec<u8>, Option<ClientSeq>, u64),
        batch: &mut Batch,
        out: &mut Vec<Response>,
    ) {
        let ctx = ApplyCtx {
            index: log_id.index(),
            term: log_id.committed_leader_id().term(),
            timestamp_ms: self.advance_clock(timestamp_ms),
        };
        let repeat = client.is_some_and(|c| {
            batch
                .commands
                .iter()
                .any(|(_, _, b)| b.is_some_and(|b| b.client_id == c.client_id))
        });
        if service != batch.service || repeat {
            self.flush(env, batch, out);
            batch.service = service;
        }
        if let Some(response) = self.already_applied(client) {
            self.flush(env, batch, out);
            out.push(response);
            return;
        }
        batch.commands.push((ctx, payload, client));
    }

    /// Applies an entry that is neither a command nor an audit's (the batch before it already
    /// flushed): deploys, rollbacks, restores, timers, membership, blanks.
    fn apply_other(
        &mut self,
        env: &mut Env<'_>,
        log_id: crate::types::LogId,
        payload: Payload,
        out: &mut Vec<Response>,
    ) -> io::Result<()> {
        let term = log_id.committed_leader_id().term();
        let ctx = |timestamp_ms| ApplyCtx {
            index: log_id.index(),
            term,
            timestamp_ms,
        };
        match payload {
            EntryPayload::Normal(Request::DeployStored {
                service,
                module,
                size: _,
                engine,
                limits,
                timestamp_ms,
                findings,
            }) => {
                self.check_engine(env, &engine, &service, log_id.index())?;
                let at = self.advance_clock(timestamp_ms);
                let response =
                    self.deploy_stored(env, &service, &module, limits, ctx(at), findings)?;
                self.version_event(env, log_id.index(), &service, at, &response);
                out.push(response);
            }
            EntryPayload::Normal(Request::Rollback {
                service,
                to,
                timestamp_ms,
            }) => {
                let at = self.advance_clock(timestamp_ms);
                let response = self.rollback(env, &service, to, ctx(at))?;
                self.version_event(env, log_id.index(), &service, at, &response);
                out.push(response);
            }
            EntryPayload::Normal(Request::Restore {
                backup,
                force,
                timestamp_ms,
            }) => {
                self.advance_clock(timestamp_ms);
                out.push(self.restore_backup(env, backup, force)?);
            }
            EntryPayload::Normal(Request::FireTimers { timestamp_ms }) => {
                let at = self.advance_clock(timestamp_ms);
                out.push(self.fire_timers(env, ctx(at)));
            }
            EntryPayload::Normal(Request::FireDue {
                timestamp_ms,
                timers,
            }) => {
                out.push(self.fire_due(env, log_id.index(), term, timestamp_ms, &timers));
            }
            EntryPayload::Normal(Request::ClusterVersion { version }) => {
                self.raise_cluster_version(env, version, log_id.index())?;
                out.push(Response::Empty);
            }
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(log_id), m);
                out.push(Response::Empty);
            }
            EntryPayload::Blank => {
                out.push(Response::Empty);
            }
            EntryPayload::Normal(Request::Deploy { .. } | Request::ForcedDeploy { .. }) => {
                unreachable!("an inline deploy is applied as a stored one (see above)")
            }
            EntryPayload::Normal(
                Request::Command { .. }
                | Request::Audit { .. }
                | Request::AuditReport { .. }
                | Request::AuditVotes { .. },
            ) => unreachable!("commands and audits are applied by apply_all"),
        }
        Ok(())
    }

    /// The reply to a command its client's session already applied (a retry: the same answer,
    /// no effect), or a refusal when it is older than the last one applied.
    fn already_applied(&self, client: Option<ClientSeq>) -> Option<Response> {
        let c = client?;
        let s = self.sessions.get(&c.client_id).filter(|s| c.seq <= s.seq)?;
        Some(if c.seq == s.seq {
            s.response.clone()
        } else {
            Response::Rejected(format!(
                "sequence {} of client {:x} is older than its last applied command ({}); its \
                 reply is no longer kept",
                c.seq, c.client_id, s.seq
            ))
        })
    }
    /// Turns a deploy entry that carries its module (written by an earlier release) into one
    /// that names it, after putting the module into the store; other entries pass unchanged.
    /// Fails only when the store cannot take the module (a full disk): the node must stop
    /// rather than answer differently from its peers.
    fn store_inline(&self, env: &mut Env<'_>, payload: Payload) -> io::Result<Payload> {
        let (service, module, engine, limits, timestamp_ms, findings) = match payload {
            EntryPayload::Normal(Request::Deploy {
                service,
                module,
                engine,
                limits,
                timestamp_ms,
            }) => (service, module, engine, limits, timestamp_ms, None),
            EntryPayload::Normal(Request::ForcedDeploy {
                service,
                module,
                engine,
                limits,
                timestamp_ms,
                findings,
            }) => (
                service,
                module,
                engine,
                limits,
                timestamp_ms,
                Some(findings),
            ),
            other => return Ok(other),
        };
        let hash = env.modules.insert(&module)?;
        Ok(EntryPayload::Normal(Request::DeployStored {
            service,
            module: hash.to_hex(),
            size: module.len() as u64,
            engine,
            limits,
            timestamp_ms,
            findings,
        }))
    }
    /// A deploy validated by an engine with another fingerprint could run differently here
    /// than on the other replicas: the node stops instead.
    fn check_engine(
        &self,
        env: &mut Env<'_>,
        engine: &str,
        service: &str,
        index: u64,
    ) -> io::Result<()> {
        if engine == env.runtime.fingerprint() {
            return Ok(());
        }
        if env.earlier.trusts(engine, index) {
            tracing::warn!(
                service,
                index,
                theirs = engine,
                ours = env.runtime.fingerprint(),
                "applying again a deploy that this node's previous build applied, validated by \
                 the engine it ran; audits compare the replicas"
            );
            return Ok(());
        }
        let msg = format!(
            "refusing to apply the deploy of service {service:?} at index {index}: it was validated by \
             engine {engine}, this node runs {}; running it here could diverge from the other \
             replicas. Run the same waft build (and limits) on every node.",
            env.runtime.fingerprint()
        );
        tracing::error!("{msg}");
        Err(io::Error::other(msg))
    }
    /// Applies a [`Request::ClusterVersion`] entry: the version rises (never falls). A node
    /// whose build cannot run the new version stops here, before it could misread an entry
    /// written in its formats, and says which build to run.
    fn raise_cluster_version(
        &mut self,
        env: &mut Env<'_>,
        version: u32,
        index: u64,
    ) -> io::Result<()> {
        if version <= self.cluster_version {
            return Ok(());
        }
        if let Some(why) = env.runs.refusal(version) {
            let msg = format!("refusing to apply the entry at index {index}: {why}");
            tracing::error!("{msg}");
            return Err(io::Error::other(msg));
        }
        tracing::info!(
            from = self.cluster_version,
            to = version,
            index,
            "the cluster version rose"
        );
        self.cluster_version = version;
        Ok(())
    }
    /// Time never goes backwards: a new leader with a slower clock gets the previous time.
    pub(super) fn advance_clock(&mut self, proposed_ms: u64) -> u64 {
        self.last_timestamp_ms = self.last_timestamp_ms.max(proposed_ms);
        self.last_timestamp_ms
    }
    /// Applies the commands of `batch` (to one service, in one call where the guest allows)
    /// and answers each.
    fn flush(&mut self, env: &mut Env<'_>, batch: &mut Batch, out: &mut Vec<Response>) {
        if batch.commands.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut batch.commands);
        let service = batch.service.as_str();
        let name: Arc<str> = Arc::from(service);
        env.seen.applying = (entries[0].0.index, Some(name.clone()));
        // Per entry, the events its call emitted (guests that import timers or events).
        let mut emitted: Vec<Emitted> = Vec::new();
        let responses: Vec<Response> = match self.services.get_mut(service) {
            None => entries
                .iter()
                .map(|_| Response::NoSuchService(service.to_owned()))
                .collect(),
            Some(svc) => {
                let started = std::time::Instant::now();
                let responses: Vec<Response> = if svc.module.info().uses_effects {
                    // Timers and events: one entry at a time, each entry's timer changes made
                    // before the next runs (its checks see them).
                    let super::Service { guest, timers, .. } = svc;
                    entries
                        .iter()
                        .map(|(ctx, cmd, _)| {
                            let t: &super::Timers = timers;
                            let mut check = |e: &[crate::runtime::Effect]| t.check(e);
                            let (result, effects) = guest.apply_effects(*ctx, cmd, &mut check);
                            emitted.push(timers.apply(*ctx, effects));
                            guest_response(result)
                        })
                        .collect()
                } else {
                    let calls: Vec<(ApplyCtx, &[u8])> =
                        entries.iter().map(|(c, p, _)| (*c, p.as_slice())).collect();
                    svc.guest
                        .apply_batch(&calls)
                        .into_iter()
                        .map(guest_response)
                        .collect()
                };
                // Observation only: the clock never reaches the guest or the replicated state.
                let per_entry_us =
                    (started.elapsed().as_micros() as u64) / (responses.len().max(1) as u64);
                // The service's name is copied only the first time (this is the apply hot path).
                if !env.seen.stats.contains_key(service) {
                    env.seen
                        .stats
                        .insert(service.to_owned(), ServiceStats::default());
                }
                let stats = env.seen.stats.get_mut(service).expect("inserted above");
                let bucket = APPLY_BUCKETS_US
                    .iter()
                    .position(|b| per_entry_us <= *b)
                    .unwrap_or(APPLY_BUCKETS_US.len());
                for r in &responses {
                    match r {
                        Response::Rejected(_) => stats.rejected += 1,
                        Response::Trapped(_) => stats.trapped += 1,
                        _ => stats.applied += 1,
                    }
                    stats.latency_buckets[bucket] += 1;
                    stats.latency_sum_us += per_entry_us;
                }
                responses
            }
        };
        let mut emitted = emitted.into_iter();
        for ((ctx, payload, client), response) in entries.into_iter().zip(responses) {
            if let Some(c) = client {
                self.remember(c, ctx.index, &response);
            }
            let events = emitted.next();
            env.seen.pending_events.push(Event {
                index: ctx.index,
                service: name.clone(),
                timestamp_ms: ctx.timestamp_ms,
                payload,
                outcome: match &response {
                    Response::Reply(r) => Outcome::Reply(r.clone()),
                    Response::Rejected(m) => Outcome::Rejected(m.clone()),
                    other => Outcome::Failed(failure(other)),
                },
                memo: Default::default(),
            });
            if let Some(events) = events {
                self.emitted(env, &name, ctx, events);
            }
            out.push(response);
        }
    }
    /// Records the outcome of a deploy or rollback for watchers.
    pub(super) fn version_event(
        &mut self,
        env: &mut Env<'_>,
        index: u64,
        service: &str,
        timestamp_ms: u64,
        response: &Response,
    ) {
        let outcome = match response {
            Response::Deployed { version, .. } => Outcome::Version(*version),
            other => Outcome::Failed(failure(other)),
        };
        env.seen.pending_events.push(Event {
            index,
            service: Arc::from(service),
            timestamp_ms,
            payload: Vec::new(),
            outcome,
            memo: Default::default(),
        });
    }
    pub(super) fn remember(&mut self, c: ClientSeq, index: u64, response: &Response) {
        self.sessions.insert(
            c.client_id,
            Session {
                seq: c.seq,
                response: response.clone(),
                index,
            },
        );
        if self.sessions.len() > MAX_SESSIONS
            && let Some((&oldest, _)) = self.sessions.iter().min_by_key(|(id, s)| (s.index, **id))
        {
            self.sessions.remove(&oldest);
        }
    }
}
