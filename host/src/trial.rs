//! Try before deploy (`waft deploy --dry-run`): the commands a service applied, or a file of
//! commands, run through the running module and the new one side by side, replies compared.
//!
//! The running service's instance history says where to start: its base state (as of its last
//! rebase) and every command applied since, with each entry's context. The running module is
//! rebuilt from the base and replays them, giving exactly the replies the service gave (the
//! same instance history); the new module is opened on the same base, as a deploy would open
//! it, and gets the same commands. With a file of commands both start from the state now.
//! Everything runs in throwaway instances: the live service is not touched.

use crate::runtime::{
    ApplyCtx, GuestError, GuestModule, Limits, ReplayCall, ReplayForm, ReplayPoint, Runtime,
};
use std::sync::Arc;

/// Differences shown in a report.
const SHOWN: usize = 5;
/// Characters of a reply shown.
const SHOWN_CHARS: usize = 160;

/// What a trial replayed and where the replies differed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trial {
    /// `history` (the commands the service applied since its last rebase) or `file`.
    pub source: String,
    /// Commands replayed.
    pub commands: u64,
    /// Commands whose reply from the new module differs from the running module's.
    pub differing: u64,
    /// The first differences.
    pub first: Vec<Difference>,
    /// Log index of the first command replayed (history) or 0 (file).
    pub from_index: u64,
    /// Log index of the last command replayed (history) or 0 (file).
    pub to_index: u64,
    /// Every command replayed, in order (for the verifier).
    pub replayed: Vec<Vec<u8>>,
}

/// One command answered differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Its log index (history) or its position in the file, from 1.
    pub at: u64,
    /// The command, as text.
    pub command: String,
    /// The running module's reply.
    pub running: String,
    /// The new module's reply.
    pub new: String,
}

fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.chars().count() > SHOWN_CHARS {
        format!("{}...", text.chars().take(SHOWN_CHARS).collect::<String>())
    } else {
        text.into_owned()
    }
}

fn show_reply(r: &Result<Vec<u8>, GuestError>) -> String {
    match r {
        Ok(b) => show(b),
        Err(e) => format!("error: {e}"),
    }
}

/// The running service, as a trial needs it.
#[derive(Debug)]
pub struct Running {
    /// Its module.
    pub module: Arc<GuestModule>,
    /// Its limits.
    pub limits: Limits,
    /// Its instance history.
    pub form: ReplayForm,
}

/// Runs the trial: `file` commands from the state now, or (`None`) the service's own history.
pub fn trial(
    runtime: &Runtime,
    service: &str,
    running: &Running,
    new_module: &Arc<GuestModule>,
    new_limits: Limits,
    file: Option<&[Vec<u8>]>,
) -> Result<Trial, String> {
    let label = format!("{service} (trial)");
    let refused = |e: &dyn std::fmt::Display| format!("the new module refused the state: {e}");
    let mut report = Trial::default();
    let mut compare = |at: u64, command: &[u8], old: Result<Vec<u8>, GuestError>, new| {
        report.commands += 1;
        report.replayed.push(command.to_vec());
        if old != new {
            report.differing += 1;
            if report.first.len() < SHOWN {
                report.first.push(Difference {
                    at,
                    command: show(command),
                    running: show_reply(&old),
                    new: show_reply(&new),
                });
            }
        }
    };
    match file {
        Some(commands) => {
            let mut old = runtime
                .from_replay(
                    &running.module,
                    &label,
                    running.limits.clone(),
                    &running.form,
                )
                .map_err(|e| format!("cannot rebuild the running service: {e}"))?;
            let now = running
                .form
                .journal
                .last()
                .map_or(running.form.opened_at, |e| e.at);
            let base: Arc<[u8]> = old.state().map_err(|e| e.to_string())?.into();
            let mut new = runtime
                .open(new_module, &label, new_limits, ctx(now, 0), Some(base))
                .map_err(|e| refused(&e))?;
            for (i, command) in commands.iter().enumerate() {
                let at = ctx(now, i as u64 + 1);
                let (o, n) = (old.apply(at, command), new.apply(at, command));
                compare(i as u64 + 1, command, o, n);
            }
            report.source = "file".into();
        }
        None => {
            let start = ReplayForm {
                opened_at: running.form.opened_at,
                base: running.form.base.clone(),
                journal: Vec::new(),
            };
            let mut old = runtime
                .from_replay(&running.module, &label, running.limits.clone(), &start)
                .map_err(|e| format!("cannot rebuild the running service: {e}"))?;
            let base: Arc<[u8]> = old.state().map_err(|e| e.to_string())?.into();
            let mut new = runtime
                .open(
                    new_module,
                    &label,
                    new_limits,
                    ctx(running.form.opened_at, 0),
                    Some(base),
                )
                .map_err(|e| refused(&e))?;
            for entry in &running.form.journal {
                let at = ctx(entry.at, 0);
                match &entry.call {
                    ReplayCall::Apply(command) => {
                        let (o, n) = (old.apply(at, command), new.apply(at, command));
                        if report.from_index == 0 {
                            report.from_index = entry.at.index;
                        }
                        report.to_index = entry.at.index;
                        compare(entry.at.index, command, o, n);
                    }
                    ReplayCall::Snapshot => {
                        // Keeps both histories in step with the live one (audits, deploys).
                        let _ = (old.snapshot(), new.snapshot());
                    }
                    ReplayCall::Fire { key, payload } => {
                        // A timer delivered: both take it (a 0.1.0 module cannot, and says so).
                        let mut any = |_: &[crate::runtime::Effect]| Ok(());
                        let _ = old.fire(at, key, payload, &mut any);
                        let _ = new.fire(at, key, payload, &mut any);
                    }
                }
            }
            report.source = "history".into();
        }
    }
    Ok(report)
}

fn ctx(at: ReplayPoint, plus: u64) -> ApplyCtx {
    ApplyCtx {
        index: at.index + plus,
        term: at.term,
        timestamp_ms: at.timestamp_ms,
    }
}
