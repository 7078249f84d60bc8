//! A fault in waft's own apply code (outside any guest call): the node stops alone, loudly,
//! naming the entry, and remembers it across a restart.
//!
//! Faults inside a guest call are contained as traps of that call (`runtime/contain.rs`). A
//! panic anywhere else while entries are applied (sessions, timers, deploys: waft's own code)
//! leaves the replicated state half-changed, so the node must stop rather than carry on. Every
//! replica applies the same entry, so a deterministic bug there stops each of them at the same
//! index: each must say so in words an operator can act on, and never silently, nor again at
//! the same entry after a restart without saying that it already did.
//!
//! The fault is written to `apply-fault.json` beside the snapshots (index, service, message,
//! how many times). On restart the node reads it: when it reaches that entry again it logs that
//! this entry stopped it before; if the entry stops it again the message counts the times;
//! once the entry applies, the record is removed. What an operator does is in
//! docs/operations.md ("A node stopped applying an entry").

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use super::{Applied, SmState};
use crate::runtime::panic_message;
use crate::types::Entry;
use openraft::entry::RaftEntry;

/// The file a fault is recorded in, in the state machine's directory.
pub(super) const FAULT_FILE: &str = "apply-fault.json";

/// An entry whose application stopped this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyFault {
    /// Log index of the entry (or of the first entry of the service's batch).
    pub index: u64,
    /// The service whose commands were being applied, if the fault came while applying them.
    pub service: Option<String>,
    /// What failed.
    pub message: String,
    /// How many times applying this entry stopped this node.
    pub times: u32,
}

/// The fault record of one state machine directory.
#[derive(Debug)]
pub(super) struct FaultRecord {
    path: PathBuf,
    /// The fault read at start or written since, while its entry has not been applied.
    last: Option<ApplyFault>,
}

impl FaultRecord {
    /// Reads the record in `dir`, if a fault stopped this node before.
    pub(super) fn open(dir: &Path) -> FaultRecord {
        let path = dir.join(FAULT_FILE);
        let last = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ApplyFault>(&b).ok());
        if let Some(f) = &last {
            tracing::warn!(
                index = f.index,
                service = f.service.as_deref().unwrap_or("-"),
                times = f.times,
                "applying entry {} stopped this node before ({}); it will be applied again",
                f.index,
                f.message
            );
        }
        FaultRecord { path, last }
    }

    /// Applies `entries` to `st`; a panic becomes an error that stops the node, naming the
    /// entry, and is recorded.
    pub(super) fn apply(&mut self, st: &mut SmState, entries: Vec<Entry>) -> io::Result<Applied> {
        let (Some(first), Some(last)) = (
            entries.first().map(|e| e.log_id().index()),
            entries.last().map(|e| e.log_id().index()),
        ) else {
            return st.apply_entries(entries);
        };
        if let Some(f) = &self.last
            && (first..=last).contains(&f.index)
        {
            tracing::warn!(
                index = f.index,
                "applying entry {} again, which stopped this node {} time(s) before: {}",
                f.index,
                f.times,
                f.message
            );
        }
        match catch_unwind(AssertUnwindSafe(|| st.apply_entries(entries))) {
            Ok(applied) => {
                if self.last.as_ref().is_some_and(|f| f.index <= last) && applied.is_ok() {
                    let f = self.last.take();
                    let _ = std::fs::remove_file(&self.path);
                    if let Some(f) = f {
                        tracing::info!(
                            index = f.index,
                            "the entry that stopped this node before applied this time"
                        );
                    }
                }
                applied
            }
            Err(payload) => Err(self.stopped(st, panic_message(payload.as_ref()))),
        }
    }

    /// Records the fault that interrupted the entry `st` was applying; the error that stops
    /// the node.
    fn stopped(&mut self, st: &SmState, what: String) -> io::Error {
        let (index, service) = st.local.seen.applying.clone();
        let service = service.map(|s| s.to_string());
        let times = match &self.last {
            Some(f) if f.index == index => f.times.saturating_add(1),
            _ => 1,
        };
        let fault = ApplyFault {
            index,
            service: service.clone(),
            message: what.clone(),
            times,
        };
        if let Ok(bytes) = serde_json::to_vec_pretty(&fault)
            && let Err(e) = std::fs::write(&self.path, bytes)
        {
            tracing::error!(error = %e, path = %self.path.display(), "cannot record the apply fault");
        }
        self.last = Some(fault);
        let whose = match &service {
            Some(s) => format!(" (service {s:?})"),
            None => String::new(),
        };
        let again = if times > 1 {
            format!(
                " This is the {} time this entry stopped this node.",
                ordinal(times)
            )
        } else {
            String::new()
        };
        let msg = format!(
            "applying entry {index}{whose} failed in waft's own code: {what}. This node stops \
             rather than carry on from a half-applied entry; its log and snapshots are intact.{again} \
             Every replica applies this entry: if others stopped at it too, it is a waft bug that \
             needs a fixed build (see docs/operations.md, \"A node stopped applying an entry\")."
        );
        tracing::error!(index, service = service.as_deref().unwrap_or("-"), "{msg}");
        io::Error::other(msg)
    }
}

fn ordinal(n: u32) -> String {
    match n {
        2 => "second".to_owned(),
        3 => "third".to_owned(),
        n => format!("{n}th"),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::runtime::{Runtime, RuntimeConfig};
    use crate::storage::events::{Events, HistoryLimits};
    use crate::storage::modules::ModuleStore;
    use crate::types::LogId;
    use std::cell::Cell;
    use std::sync::{Arc, Mutex};

    thread_local! {
        /// The index at which this thread's apply panics, as a bug in waft's apply would.
        static PANIC_AT: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// Called by `apply_all` for each entry (tests only).
    pub(in crate::storage::state_machine) fn maybe_panic(index: u64) {
        if PANIC_AT.with(|p| p.get()) == Some(index) {
            panic!("an injected fault at entry {index}");
        }
    }

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(
                openraft::impls::leader_id_adv::LeaderId {
                    term: 1,
                    node_id: 1,
                },
                index,
            ),
            payload: openraft::EntryPayload::Blank,
        }
    }

    fn state(dir: &Path) -> SmState {
        let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
        let modules = ModuleStore::open(&dir.join("modules")).expect("modules");
        SmState::new(
            runtime,
            modules,
            Arc::new(Events::new(HistoryLimits::default())),
            Arc::new(Mutex::new(Default::default())),
            Arc::new(tokio::sync::watch::channel(None).0),
        )
    }

    #[test]
    fn a_fault_in_waft_s_apply_stops_naming_the_entry_and_is_remembered_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        PANIC_AT.with(|p| p.set(Some(3)));
        let mut st = state(dir.path());
        let mut record = FaultRecord::open(dir.path());
        let e = record
            .apply(&mut st, (1..=5).map(blank).collect())
            .expect_err("the fault stops the apply");
        assert!(
            e.to_string().contains(
                "applying entry 3 failed in waft's own code: an injected fault at entry 3"
            ),
            "{e}"
        );
        assert!(!e.to_string().contains("second time"), "{e}");

        // A restart: the record is read back, the same entry stops it again, and says so.
        let mut st = state(dir.path());
        let mut record = FaultRecord::open(dir.path());
        assert_eq!(
            record.last.as_ref().map(|f| (f.index, f.times)),
            Some((3, 1))
        );
        let e = record
            .apply(&mut st, (1..=5).map(blank).collect())
            .expect_err("stops again");
        assert!(
            e.to_string()
                .contains("the second time this entry stopped this node"),
            "{e}"
        );

        // Fixed (a new build): the entry applies, and the record is gone.
        PANIC_AT.with(|p| p.set(None));
        let mut st = state(dir.path());
        let mut record = FaultRecord::open(dir.path());
        record
            .apply(&mut st, (1..=5).map(blank).collect())
            .expect("applies");
        assert!(record.last.is_none());
        assert!(!dir.path().join(FAULT_FILE).exists());
    }
}
