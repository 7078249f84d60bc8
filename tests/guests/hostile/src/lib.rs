//! A guest that misbehaves on command, to test that waft contains it.
//!
//! State: a map of names to values, changed by `set NAME VALUE`. Misbehaviour:
//! - `loop`: spins forever (fuel runs out)
//! - `bomb`: allocates until memory runs out
//! - `panic-after-set NAME VALUE`: changes state, then panics
//! - `huge BYTES`: replies with that many bytes
//! - `log N`: writes N log lines and N lines to stdout
//! - `reject-after-set NAME VALUE`: changes state, then answers `err` (breaks the contract)
//! - `print-flush N`: N lines to stdout and to stderr, each flushed at once
//! - `print-mb N`: N MiB to stdout, in one flushed write per 4 KiB
//! - `stdin`: reads stdin to its end (always empty in waft) and replies with the byte count
//! - `recurse`: recurses until the stack overflows
//! - `panic-stderr`: writes to stderr, flushed, then panics
//! The same words as queries (but `set`) do the same without changing anything.
//! `snapshot` and `restore` (so every snapshot, rebase and restore) print a flushed line to
//! stdout and to stderr.
//! Snapshots: `restore` of the bytes `TRAP` traps, of `BAD` answers `err`; `snapshot` traps when
//! the state holds the name `trap-on-snapshot`.

use std::collections::BTreeMap;
use waft_guest::{Context, Level, StateMachine};

#[derive(Default)]
struct Hostile {
    values: BTreeMap<String, String>,
    hoard: Vec<Vec<u8>>,
}

impl StateMachine for Hostile {
    fn apply(&mut self, _ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(command);
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["set", name, value] => {
                self.values.insert(name.to_string(), value.to_string());
                Ok(b"OK".to_vec())
            }
            ["loop"] => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            ["bomb"] => loop {
                // Reserve without touching, so memory (not fuel) is what runs out.
                let mut chunk = Vec::with_capacity(4 << 20);
                chunk.push(1u8);
                self.hoard.push(chunk);
            },
            ["panic-after-set", name, value] => {
                self.values.insert(name.to_string(), value.to_string());
                panic!("deliberate panic after setting {name}");
            }
            ["reject-after-set", name, value] => {
                self.values.insert(name.to_string(), value.to_string());
                Err("rejected, but changed state first".to_owned())
            }
            ["huge", bytes] => {
                let n: usize = bytes.parse().map_err(|_| "huge takes a byte count")?;
                Ok(vec![b'x'; n])
            }
            ["log", n] => {
                let n: usize = n.parse().map_err(|_| "log takes a count")?;
                for i in 0..n {
                    waft_guest::log(Level::Info, &format!("log line {i}"));
                    println!("stdout line {i}");
                }
                Ok(b"OK".to_vec())
            }
            other => io_misbehaviour(other).unwrap_or_else(|| Err(format!("unknown command {text:?}"))),
        }
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(request);
        match text.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["get", name] => self
                .values
                .get(*name)
                .map(|v| v.clone().into_bytes())
                .ok_or_else(|| format!("no value {name}")),
            ["loop"] => loop {
                std::hint::black_box(());
            },
            ["bomb"] => {
                let mut hoard = Vec::new();
                loop {
                    let mut chunk = Vec::with_capacity(4 << 20);
                    chunk.push(1u8);
                    hoard.push(chunk);
                    std::hint::black_box(&hoard);
                }
            }
            ["huge", bytes] => {
                let n: usize = bytes.parse().map_err(|_| "huge takes a byte count")?;
                Ok(vec![b'x'; n])
            }
            other => io_misbehaviour(other).unwrap_or_else(|| Err("unknown query".to_owned())),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        say("snapshot");
        if self.values.contains_key("trap-on-snapshot") {
            panic!("deliberate panic in snapshot");
        }
        let mut out = String::new();
        for (k, v) in &self.values {
            out.push_str(&format!("{k}={v}\n"));
        }
        out.into_bytes()
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        match snapshot {
            b"TRAP" => panic!("deliberate panic in restore"),
            b"BAD" => Err("snapshot rejected: BAD".to_owned()),
            _ => {
                say("restored");
                let text = std::str::from_utf8(snapshot).map_err(|_| "not UTF-8")?;
                let mut values = BTreeMap::new();
                for line in text.lines() {
                    let (k, v) = line.split_once('=').ok_or("corrupt line")?;
                    values.insert(k.to_owned(), v.to_owned());
                }
                Ok(Hostile {
                    values,
                    hoard: Vec::new(),
                })
            }
        }
    }
}

/// The misbehaviour with WASI's streams, clocks and sockets, the same in `apply` and `query`;
/// `None` for any other command.
fn io_misbehaviour(words: &[&str]) -> Option<Result<Vec<u8>, String>> {
    use std::io::{Read, Write};
    Some(match words {
        ["print-flush", n] => {
            let n: usize = n.parse().map_err(|_| "print-flush takes a count").ok()?;
            for i in 0..n {
                let _ = writeln!(std::io::stdout(), "flushed stdout line {i}");
                let _ = std::io::stdout().flush();
                let _ = writeln!(std::io::stderr(), "flushed stderr line {i}");
                let _ = std::io::stderr().flush();
            }
            Ok(b"OK".to_vec())
        }
        ["print-mb", n] => {
            let n: usize = n.parse().ok()?;
            let chunk = [b'x'; 4096];
            let mut out = std::io::stdout();
            for _ in 0..n * 256 {
                let _ = out.write_all(&chunk);
                let _ = out.flush();
            }
            Ok(b"OK".to_vec())
        }
        ["stdin"] => {
            let mut buf = Vec::new();
            match std::io::stdin().read_to_end(&mut buf) {
                Ok(n) => Ok(format!("read {n} bytes").into_bytes()),
                Err(e) => Err(format!("stdin: {e}")),
            }
        }
        ["recurse"] => Ok(recurse(0).to_le_bytes().to_vec()),
        ["panic-stderr"] => {
            let _ = writeln!(std::io::stderr(), "about to panic");
            let _ = std::io::stderr().flush();
            panic!("deliberate panic after a flushed stderr line");
        }
        _ => return None,
    })
}

/// One line to stdout and one to stderr, each flushed.
fn say(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{what}");
    let _ = std::io::stdout().flush();
    let _ = writeln!(std::io::stderr(), "{what}, on stderr");
    let _ = std::io::stderr().flush();
}

/// Recurses without end (the stack overflows first).
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    recurse(depth + 1).wrapping_add(frame[(depth % 64) as usize])
}

waft_guest::export!(Hostile);
