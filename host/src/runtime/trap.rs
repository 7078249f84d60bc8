//! What a trapped guest call was: waft's own fault reached from the call (a host fault), a
//! resource limit, fuel, a panic (with the message the guest's stderr gives: a Rust panic, an
//! uncaught Python exception) or another trap, in words for the reply and the log.

use super::contain::HostFault;
use super::error::{GuestError, TrapKind};
use super::module::root_message;
use wasmtime::Trap;

/// Classifies the error `e` of a call, given the tail of its stderr, the limit the resource
/// limiter saw broken (if any) and the fuel the call was given; also whether it was a host
/// fault.
pub(super) fn classify(
    e: &wasmtime::Error,
    stderr: &str,
    limit_hit: Option<String>,
    fuel: u64,
) -> (GuestError, bool) {
    if let Some(fault) = e.downcast_ref::<HostFault>() {
        let error = GuestError::Trap {
            kind: TrapKind::HostFault,
            detail: format!("{} (a bug in waft, not the guest's doing)", fault.0),
        };
        return (error, true);
    }
    let trap = e.downcast_ref::<Trap>().copied();
    let said = explain_stderr(stderr);
    let (kind, detail) = match (limit_hit, trap) {
        (Some(why), _) => (TrapKind::OutOfMemory, why),
        (None, Some(Trap::OutOfFuel)) => (
            TrapKind::OutOfFuel,
            format!("the call used all of its fuel ({fuel} units)"),
        ),
        (None, Some(Trap::UnreachableCodeReached)) => match said.take_panic() {
            Some(panic) => {
                let error = GuestError::Trap {
                    kind: TrapKind::Panic,
                    detail: panic,
                };
                return (error, false);
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
    (GuestError::Trap { kind, detail }, false)
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
        // componentize-py turns an uncaught Python exception into a Rust panic after printing
        // the traceback: its last line (the exception) says what happened.
        let exception = self.lines[..at]
            .iter()
            .rposition(|l| l.starts_with("Traceback (most recent call last)"))
            .and_then(|_| self.lines[..at].last());
        Some(match (exception, message.is_empty()) {
            (Some(exception), _) => format!("uncaught {exception}"),
            (None, true) => format!("panic at {location}"),
            (None, false) => format!("{message} (at {location})"),
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
