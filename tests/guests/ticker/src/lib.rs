//! A `waft:fsm@0.2.0` test guest that drives timers and events from text commands:
//!
//! - `set KEY AT_MS [PAYLOAD]`, `after KEY DELAY_MS [PAYLOAD]`, `cancel KEY`
//! - `many N PREFIX DELAY_MS`: sets N timers `PREFIX0`..
//! - `emit TOPIC TEXT`, `emit-big TOPIC BYTES`, `emit-n N TOPIC`
//! - `set-then-reject KEY`, `set-then-panic KEY`: effects that must not survive
//! - `note TEXT`: changes the state only
//!
//! `fire` records each delivery (key, index, timestamp, payload) in the state and emits
//! `fired/KEY`; payload `panic` panics (after a flushed line on stderr), `reject` rejects,
//! `loop` loops until its fuel runs out, `print` prints a flushed line to stdout and to stderr
//! first, `again:MS` sets the timer again MS later (once). Queries: `fired` (one line per
//! delivery), `notes`.

use std::collections::BTreeMap;
use std::io::Write;
use waft_guest::{Context, StateMachine, events, timers};

#[derive(Default)]
struct Ticker {
    fired: Vec<String>,
    notes: BTreeMap<u64, String>,
}

impl StateMachine for Ticker {
    fn apply(&mut self, ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(command).map_err(|_| "not UTF-8")?;
        let words: Vec<&str> = text.split(' ').collect();
        let num = |i: usize| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("word {i} of {text:?} is not a number"))
        };
        let word = |i: usize| -> Result<&str, String> {
            words.get(i).copied().ok_or_else(|| format!("{text:?} is too short"))
        };
        let payload = words.get(3).copied().unwrap_or("").as_bytes();
        match words[0] {
            "set" => timers::set(word(1)?, num(2)?, payload),
            "after" => timers::set_after(ctx, word(1)?, num(2)?, payload),
            "cancel" => timers::cancel(word(1)?),
            "many" => {
                let (n, prefix, delay) = (num(1)?, word(2)?, num(3)?);
                for i in 0..n {
                    timers::set_after(ctx, &format!("{prefix}{i}"), delay, b"");
                }
            }
            "emit" => events::emit(word(1)?, words[2..].join(" ").as_bytes()),
            "emit-big" => events::emit(word(1)?, &vec![b'x'; num(2)? as usize]),
            "emit-n" => {
                for i in 0..num(1)? {
                    events::emit(word(2)?, i.to_string().as_bytes());
                }
            }
            "set-then-reject" => {
                timers::set_after(ctx, word(1)?, 1, b"");
                events::emit("rejected", b"");
                return Err("rejected after setting a timer".into());
            }
            "set-then-panic" => {
                timers::set_after(ctx, word(1)?, 1, b"");
                self.notes.insert(ctx.index, "before the panic".into());
                panic!("panicked after setting a timer");
            }
            "note" => {
                self.notes.insert(ctx.index, words[1..].join(" "));
            }
            other => return Err(format!("unknown command {other:?}")),
        }
        Ok(format!("ok {}", ctx.index).into_bytes())
    }

    fn fire(&mut self, ctx: &Context, key: &str, payload: &[u8]) -> Result<(), String> {
        let payload = String::from_utf8_lossy(payload);
        match payload.as_ref() {
            "panic" => {
                let _ = writeln!(std::io::stderr(), "timer {key} is about to panic");
                let _ = std::io::stderr().flush();
                panic!("timer {key} panics")
            }
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "print" => {
                let _ = writeln!(std::io::stdout(), "timer {key} fired");
                let _ = std::io::stdout().flush();
                let _ = writeln!(std::io::stderr(), "timer {key} fired, on stderr");
                let _ = std::io::stderr().flush();
            }
            "reject" => return Err(format!("timer {key} rejected")),
            p => {
                if let Some(ms) = p.strip_prefix("again:") {
                    let ms: u64 = ms.parse().map_err(|_| "bad again: payload")?;
                    timers::set_after(ctx, key, ms, b"");
                }
            }
        }
        self.fired
            .push(format!("{key} {} {} {payload}", ctx.index, ctx.timestamp_ms));
        events::emit(&format!("fired/{key}"), payload.as_bytes());
        Ok(())
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        match request {
            b"fired" => Ok(self.fired.join("\n").into_bytes()),
            b"notes" => Ok(self
                .notes
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()),
            _ => Err("unknown query".into()),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = self.fired.join("\n");
        out.push('\u{0}');
        for (i, n) in &self.notes {
            out.push_str(&format!("{i}={n}\n"));
        }
        out.into_bytes()
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(snapshot).map_err(|_| "snapshot not UTF-8")?;
        let (fired, notes) = text.split_once('\u{0}').ok_or("not a ticker snapshot")?;
        let mut t = Ticker {
            fired: fired
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
            notes: BTreeMap::new(),
        };
        for line in notes.lines() {
            let (i, n) = line.split_once('=').ok_or("bad note")?;
            t.notes
                .insert(i.parse().map_err(|_| "bad note index")?, n.to_owned());
        }
        Ok(t)
    }
}

waft_guest::export!(Ticker);
