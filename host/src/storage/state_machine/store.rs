//! [`StateMachineStore`]: openraft's state machine over [`SmState`]: applies entries on a
//! blocking thread, builds and installs snapshot files.

use crate::runtime::{ModuleHash, Runtime};
use crate::storage::events::{Events, HistoryLimits};
use crate::storage::modules::ModuleStore;
use crate::storage::snapshot::{self, SnapshotFile};
use crate::types::{Entry, LogId, NodeId, Request, SnapshotMeta, StoredMembership, TypeConfig};
use futures::StreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::fault::FaultRecord;
use super::{SmState, Snapshot, StateHandle, lock_or_stop};
use crate::sync::try_lock_or_stop;

/// openraft's state machine: applies entries to guests, builds and installs snapshots.
pub struct StateMachineStore {
    pub(super) handle: StateHandle,
    pub(super) dir: PathBuf,
    /// The entry whose application last stopped this node, if any (see `fault.rs`).
    fault: Arc<Mutex<FaultRecord>>,
    /// Whether cheap batches are applied on the async worker (`apply_inline`); off only to
    /// measure what that saves.
    inline: bool,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

pub(super) const CURRENT: &str = "current.snap";

/// The most entries applied on an async thread at once (see `StateMachineStore::apply_inline`).
const INLINE_ENTRIES: usize = 256;
/// The most time, at each service's measured average per entry, a batch applied on an async
/// thread may take, in µs.
const INLINE_BUDGET_US: u64 = 2_000;

impl StateMachineStore {
    /// A state machine whose snapshots live in `dir` and modules in `dir/modules`, keeping the
    /// default history for watchers.
    pub fn new(runtime: Runtime, dir: &Path) -> io::Result<StateMachineStore> {
        let modules = ModuleStore::open(&dir.join("modules"))?;
        Self::with_history(runtime, dir, modules, HistoryLimits::default())
    }

    /// A state machine whose snapshots live in `dir`, with `modules` for its module store,
    /// keeping `history` for watchers.
    pub fn with_history(
        runtime: Runtime,
        dir: &Path,
        modules: ModuleStore,
        history: HistoryLimits,
    ) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(dir)?;
        let events = Arc::new(Events::new(history));
        let view = Arc::new(Mutex::new(super::handle::View::default()));
        let timer_deadline = Arc::new(tokio::sync::watch::channel(None).0);
        let state = SmState::new(
            runtime.clone(),
            modules.clone(),
            events.clone(),
            view.clone(),
            timer_deadline.clone(),
        );
        state.publish();
        Ok(StateMachineStore {
            handle: StateHandle {
                state: Arc::new(Mutex::new(state)),
                view,
                runtime,
                events,
                timer_deadline,
                healer: Arc::default(),
                modules,
                module_peers: Arc::default(),
                compiled_fetched: Arc::default(),
            },
            dir: dir.to_path_buf(),
            fault: Arc::new(Mutex::new(FaultRecord::open(dir))),
            inline: true,
        })
    }

    /// Applies every batch on a blocking thread, never inline (for the A/B benchmark of the
    /// inline path, `scripts/bench-inline-apply.sh`).
    pub fn without_inline_apply(mut self) -> StateMachineStore {
        self.inline = false;
        self
    }

    /// Makes waft's own apply code panic, as a bug there would, at every command whose
    /// payload is `payload` (for the campaign `tests/all/chaos/apply_fault.rs`; see `fault.rs`).
    pub fn inject_apply_panic(self, payload: Vec<u8>) -> StateMachineStore {
        tracing::warn!("--inject-apply-panic is set: this node will stop applying that command");
        lock_or_stop(&self.handle.state).local.inject_panic_at = Some(payload);
        self
    }

    /// Makes this node run `runs` instead of this build's cluster versions (the hidden node
    /// flag `--cluster-versions`, with which tests play a build of another release).
    pub fn with_cluster_versions(self, runs: crate::version::Runs) -> StateMachineStore {
        if runs != crate::version::Runs::THIS_BUILD {
            tracing::warn!(%runs, "--cluster-versions is set: this node plays another build");
        }
        {
            let mut st = lock_or_stop(&self.handle.state);
            st.runs = runs;
            st.publish();
        }
        self
    }

    /// Trusts the deploys up to `earlier.until` that `earlier.engines` validated (see
    /// [`super::EarlierEngines`]).
    pub fn with_earlier_engines(self, earlier: super::EarlierEngines) -> StateMachineStore {
        lock_or_stop(&self.handle.state).earlier = earlier;
        self
    }

    /// A handle for queries and inspection.
    pub fn handle(&self) -> StateHandle {
        self.handle.clone()
    }

    /// Makes sure the module store holds every module the batch may run before the state
    /// machine's lock is taken: those its deploys name, and, when it rolls back, those of every
    /// kept version. A missing one is fetched from the other members, for as long as it takes
    /// (applying the entry without it would answer differently from the other replicas).
    ///
    /// Fails only when this node cannot store a module (a full disk): the node must stop, as
    /// for any write it cannot make, rather than apply without it.
    async fn fetch_modules(&self, batch: &[Entry]) -> io::Result<()> {
        let mut wanted: BTreeSet<ModuleHash> = BTreeSet::new();
        let mut rolls_back = false;
        for entry in batch {
            match &entry.payload {
                EntryPayload::Normal(Request::DeployStored { module, .. }) => {
                    wanted.extend(ModuleHash::from_hex(module));
                }
                EntryPayload::Normal(Request::Rollback { .. }) => rolls_back = true,
                _ => {}
            }
        }
        if rolls_back {
            for svc in self.handle.services() {
                wanted.extend(
                    svc.history
                        .iter()
                        .filter_map(|r| ModuleHash::from_hex(&r.module)),
                );
            }
        }
        let store = &self.handle.modules;
        wanted.retain(|h| !store.contains(h));
        if wanted.is_empty() {
            return Ok(());
        }
        // The members as of the last applied entry and those the batch's own membership
        // entries name: a node replaying the log from its start (one that lost its data) gets
        // the first membership entries and the first deploy in one batch, before anything
        // applied has named a member.
        let applied = self.handle.membership();
        let in_batch = batch.iter().filter_map(|e| match &e.payload {
            EntryPayload::Membership(m) => Some(m),
            _ => None,
        });
        let sources: Vec<(NodeId, String)> = std::iter::once(applied.membership())
            .chain(in_batch)
            .flat_map(|m| m.nodes().map(|(id, node)| (*id, node.addr.clone())))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect();
        for hash in wanted {
            let peers = loop {
                match self.handle.module_peers() {
                    Some(p) => break p,
                    // The node's network is not up yet (entries re-applied at start).
                    None => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            };
            tracing::info!(module = %hash, "fetching a module this node lacks before applying");
            // Without a deadline the fetch only returns once the module is here, or when this
            // node cannot write it.
            if let Err(e) = store.fetch(peers.as_ref(), &sources, &hash, None).await {
                let msg = format!(
                    "cannot store module {hash}, which the next entry needs: {e}; stopping \
                     rather than applying without it (free disk space, then restart the node)"
                );
                tracing::error!("{msg}");
                return Err(io::Error::other(msg));
            }
        }
        Ok(())
    }

    /// Compiles the modules the batch deploys before the state machine's lock is taken: the
    /// apply then finds them compiled (the runtime caches by hash), so a large component's
    /// compile never holds the lock that queries, snapshots and audits wait for. A module
    /// that does not compile fails here and again, identically on every node, in the apply.
    async fn compile_ahead(&self, batch: &[Entry]) {
        let mut inline: Vec<Vec<u8>> = Vec::new();
        let mut stored: Vec<ModuleHash> = Vec::new();
        for entry in batch {
            match &entry.payload {
                EntryPayload::Normal(
                    Request::Deploy { module, .. } | Request::ForcedDeploy { module, .. },
                ) => inline.push(module.clone()),
                EntryPayload::Normal(Request::DeployStored { module, .. }) => {
                    stored.extend(ModuleHash::from_hex(module));
                }
                _ => {}
            }
        }
        if inline.is_empty() && stored.is_empty() {
            return;
        }
        let (runtime, store) = (self.handle.runtime.clone(), self.handle.modules.clone());
        let _ = tokio::task::spawn_blocking(move || {
            for module in inline {
                let _ = runtime.load_committed(&module);
            }
            for hash in stored {
                if let Ok(module) = store.read(&hash) {
                    let _ = runtime.load_committed(&module);
                }
            }
        })
        .await;
    }

    /// Applies `pending` on this (async) thread when that is cheap, saving the two thread
    /// switches of a hand-off to the blocking pool; `None` (and `pending` untouched) otherwise.
    /// Guest calls may run here because none of them ever waits or enters the async runtime
    /// (`runtime/nonblocking.rs`). Cheap: a multi-threaded runtime (another worker keeps the
    /// node going meanwhile), the state free at once, and a batch of at most [`INLINE_ENTRIES`] commands whose services
    /// have taken [`INLINE_BUDGET_US`] in all at their measured average (see
    /// [`SmState::cheap_to_apply`]).
    fn apply_inline(&self, pending: &mut Vec<Entry>) -> Option<io::Result<super::Applied>> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let multi =
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        if !self.inline || !multi || pending.len() > INLINE_ENTRIES {
            return None;
        }
        let mut st = try_lock_or_stop(&self.handle.state)?;
        if !st.cheap_to_apply(pending, INLINE_BUDGET_US) {
            return None;
        }
        let result = crate::sync::lock_anyway(&self.fault).apply(&mut st, std::mem::take(pending));
        st.publish();
        Some(result)
    }

    /// Applies `pending` on a blocking thread.
    async fn apply_blocking(&self, pending: Vec<Entry>) -> io::Result<super::Applied> {
        let fault = self.fault.clone();
        self.blocking(move |st| crate::sync::lock_anyway(&fault).apply(st, pending))
            .await
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SmState) -> io::Result<R> + Send + 'static,
    ) -> io::Result<R> {
        let state = self.handle.state.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = lock_or_stop(&state);
            let result = f(&mut st);
            st.publish();
            result
        })
        .await
        .map_err(|e| io::Error::other(format!("state machine task failed: {e}")))?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.blocking(|st| Ok((st.rep.last_applied, st.rep.membership.clone())))
            .await
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        self.fetch_modules(&batch).await?;
        self.compile_ahead(&batch).await;
        let mut responses = Vec::with_capacity(batch.len());
        let mut pending = batch;
        loop {
            let (out, heal) = match self.apply_inline(&mut pending) {
                Some(applied) => applied?,
                None => self.apply_blocking(pending).await?,
            };
            responses.extend(out);
            let Some((plan, rest)) = heal else { break };
            self.heal(plan).await;
            pending = rest;
        }
        for (responder, response) in responders.into_iter().zip(responses) {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            handle: self.handle.clone(),
            dir: self.dir.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let current = self.dir.join(CURRENT);
        let incoming = snapshot.path.clone();
        let file = snapshot.file;
        let dir = self.dir.clone();
        self.blocking(move |st| {
            st.install(file.try_clone()?)?;
            if incoming != current {
                std::fs::rename(&incoming, &current)?;
                std::fs::File::open(&dir)?.sync_all()?;
            }
            Ok(())
        })
        .await?;
        tracing::info!(last = ?meta.last_log_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let path = self.dir.join(CURRENT);
        tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return Ok(None);
            }
            let file = SnapshotFile::open(&path)?;
            let reader = snapshot::Reader::open(file.file.try_clone()?)?;
            Ok(Some(Snapshot {
                meta: reader.header.meta,
                snapshot: file,
            }))
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Builds a snapshot of the state as it is when the builder runs.
#[derive(Debug)]
pub struct SnapshotBuilder {
    pub(super) handle: StateHandle,
    pub(super) dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let state = self.handle.state.clone();
        let path = self.dir.join(CURRENT);
        tokio::task::spawn_blocking(move || {
            // Capture under the lock (guest snapshots are in-memory copies), write outside it so
            // applies continue while the file is written.
            let started = std::time::Instant::now();
            let captured = lock_or_stop(&state).capture()?;
            let modules: Vec<&[u8]> = captured.modules.iter().map(Vec::as_slice).collect();
            let states: Vec<&[u8]> = captured.states.iter().map(Vec::as_slice).collect();
            snapshot::write(&path, &captured.header, &modules, &states)?;
            let file = SnapshotFile::open(&path)?;
            {
                let mut st = lock_or_stop(&state);
                let s = &mut st.local.snapshots;
                s.built += 1;
                s.last_built_bytes = file.size;
                s.last_build_seconds = started.elapsed().as_secs_f64();
                st.publish();
            }
            tracing::info!(
                last = ?captured.header.meta.last_log_id,
                bytes = file.size,
                "snapshot built"
            );
            Ok(Snapshot {
                meta: captured.header.meta,
                snapshot: file,
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}
