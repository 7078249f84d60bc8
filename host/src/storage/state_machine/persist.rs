//! Snapshots and backups of the state machine: capturing the state for a snapshot file,
//! installing one, restoring a backup, loading services from a snapshot.

use crate::runtime::Runtime;
use crate::storage::snapshot::{self, ServiceRecord, SnapshotHeader};
use crate::types::{Response, SnapshotMeta};
use std::collections::BTreeMap;
use std::io;

use super::{Env, Replicated, Service, SmState};

impl SmState {
    /// Takes everything a snapshot needs; the guests' states are copied now, so later entries
    /// do not leak into this snapshot.
    pub(super) fn capture(&self) -> io::Result<Captured> {
        let mut services = Vec::new();
        let mut states = Vec::new();
        for (name, svc) in &self.rep.services {
            // The guest's history, not a call on the live instance: taking a snapshot is a
            // local event (each node picks its own moment), so it must change nothing there.
            // Replaying the history rebuilds the instance byte for byte, which a fresh instance
            // restored from the guest's own snapshot would not (state hidden in a language
            // runtime), and it works for a guest whose `snapshot` traps.
            let state = crate::storage::codec::encode(&snapshot::ServiceState {
                form: svc.guest.replay_form(),
                timers: svc.timers.records(),
            })?;
            let replay = true;
            services.push(ServiceRecord {
                name: name.clone(),
                module: svc.module.hash().to_hex(),
                deployed_at: svc.deployed_at,
                state_len: state.len() as u64,
                replay,
                version: svc.history.last().map_or(0, |r| r.version),
                history: svc.history.clone(),
            });
            states.push(state);
        }
        // Each module once, whatever number of versions use it.
        let mut modules = Vec::new();
        for hash in self.rep.used_modules() {
            modules.push((hash.to_hex(), self.modules.read(&hash)?));
        }
        let last = self.rep.last_applied;
        Ok(Captured {
            header: SnapshotHeader {
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: self.rep.membership.clone(),
                },
                last_timestamp_ms: self.rep.last_timestamp_ms,
                engine: self.runtime.fingerprint().to_owned(),
                sessions: self
                    .rep
                    .sessions
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect(),
                modules: modules
                    .iter()
                    .map(|(h, b)| (h.clone(), b.len() as u64))
                    .collect(),
                services,
                cluster_version: self.rep.cluster_version,
            },
            modules: modules.into_iter().map(|(_, b)| b).collect(),
            states,
        })
    }

    /// Replaces the whole state with the one in a (verified) snapshot file.
    pub(super) fn install(&mut self, file: std::fs::File) -> io::Result<()> {
        let started = std::time::Instant::now();
        let bytes = file.metadata().map_or(0, |m| m.len());
        self.install_file(file)?;
        let s = &mut self.local.snapshots;
        s.installed += 1;
        s.last_installed_bytes = bytes;
        s.last_install_seconds = started.elapsed().as_secs_f64();
        Ok(())
    }

    pub(super) fn install_file(&mut self, file: std::fs::File) -> io::Result<()> {
        let reader = snapshot::Reader::open(file)?;
        if let Some(why) = self.runs.refusal(reader.header.cluster_version) {
            let at = reader.header.meta.last_log_id.map_or(0, |l| l.index());
            let msg = format!("refusing the snapshot at index {at}: {why}");
            tracing::error!("{msg}");
            return Err(io::Error::other(msg));
        }
        let (header, services, modules) = load_services(&self.runtime, reader)?;
        let (rep, mut env) = self.split();
        rep.keep_modules(&mut env, &modules)?;
        rep.last_applied = header.meta.last_log_id;
        rep.membership = header.meta.last_membership.clone();
        rep.last_timestamp_ms = header.last_timestamp_ms;
        rep.services = services;
        rep.sessions = header.sessions.into_iter().collect();
        rep.cluster_version = header.cluster_version;
        rep.prune_modules(&mut env);
        // The state jumped to the snapshot's: what came before it cannot be told.
        self.local
            .events
            .reset(header.meta.last_log_id.map_or(0, |l| l.index()));
        Ok(())
    }
}

/// A snapshot's header, its services in fresh guests, and its modules' bytes.
pub(super) type Loaded = (SnapshotHeader, BTreeMap<String, Service>, Vec<Vec<u8>>);

/// Loads every module and service of a (verified) snapshot into fresh guests.
pub(super) fn load_services(
    runtime: &Runtime,
    mut reader: snapshot::Reader<'_>,
) -> io::Result<Loaded> {
    let header = reader.header.clone();
    if header.engine != runtime.fingerprint() {
        tracing::warn!(
            theirs = %header.engine,
            ours = %runtime.fingerprint(),
            "loading a snapshot written by a node with a different engine fingerprint"
        );
    }
    let mut modules = Vec::new();
    let mut loaded = BTreeMap::new();
    for (hash, len) in &header.modules {
        let bytes = reader.section(*len)?;
        let module = runtime
            .load_committed(&bytes)
            .map_err(|e| io::Error::other(format!("snapshot module {hash} does not load: {e}")))?;
        if &module.hash().to_hex() != hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot module {hash} has another hash"),
            ));
        }
        loaded.insert(hash.clone(), module.clone());
        modules.push(bytes);
    }
    let mut services = BTreeMap::new();
    for record in &header.services {
        let state = reader.section(record.state_len)?;
        let module = loaded.get(&record.module).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot service {} names a missing module", record.name),
            )
        })?;
        let limits = record
            .history
            .last()
            .map(|v| v.limits)
            .unwrap_or_default()
            .apply_to(runtime.limits().clone());
        let state = snapshot::service_state(reader.format, &header, record, state)?;
        let guest = runtime
            .from_replay(module, &record.name, limits, &state.form)
            .map_err(|e| {
                io::Error::other(format!(
                    "service {} refused its snapshot state: {e}",
                    record.name
                ))
            })?;
        services.insert(
            record.name.clone(),
            Service {
                module: module.clone(),
                guest,
                deployed_at: record.deployed_at,
                history: record.history.clone(),
                timers: super::Timers::from_records(state.timers),
            },
        );
    }
    Ok((header, services, modules))
}

pub(super) struct Captured {
    pub(super) header: SnapshotHeader,
    pub(super) modules: Vec<Vec<u8>>,
    pub(super) states: Vec<Vec<u8>>,
}

impl Replicated {
    /// Applies a `Restore` entry: the services, modules and sessions of a backup replace the
    /// current ones; the log position and membership stay this cluster's. Refused (nothing
    /// changes) if services exist already and `force` is off, or the backup does not load.
    ///
    /// Fails only when the module store cannot take the backup's modules (a full disk): the
    /// node must stop rather than answer differently from its peers.
    pub(super) fn restore_backup(
        &mut self,
        env: &mut Env<'_>,
        backup: Vec<u8>,
        force: bool,
    ) -> io::Result<Response> {
        if !force && !self.services.is_empty() {
            return Ok(Response::DeployFailed(format!(
                "restore refused: this cluster already runs {} service(s); restore into an empty \
                 cluster, or force it to replace them",
                self.services.len()
            )));
        }
        let loaded = snapshot::Reader::from_bytes(&backup).and_then(|reader| {
            let theirs = reader.header.cluster_version;
            if theirs > self.cluster_version {
                return Err(io::Error::other(format!(
                    "the backup was taken at cluster version {theirs} and this cluster runs {}: \
                     it may hold what members of this version cannot read. Finalize this \
                     cluster's upgrade first",
                    self.cluster_version
                )));
            }
            load_services(env.runtime, reader)
        });
        match loaded {
            Ok((header, services, modules)) => {
                self.keep_modules(env, &modules)?;
                let names: Vec<String> = services.keys().cloned().collect();
                self.advance_clock(header.last_timestamp_ms);
                self.services = services;
                self.sessions = header.sessions.into_iter().collect();
                self.prune_modules(env);
                Ok(Response::Restored(names))
            }
            Err(e) => Ok(Response::DeployFailed(format!("restore failed: {e}"))),
        }
    }
    /// Puts the modules of a snapshot or backup into the module store.
    fn keep_modules(&self, env: &mut Env<'_>, modules: &[Vec<u8>]) -> io::Result<()> {
        for bytes in modules {
            env.modules.insert(bytes)?;
        }
        Ok(())
    }
}
