//! A replicated key-value store with text commands, written with the `waft-guest` SDK.
//!
//! Commands (submitted, replicated, applied in log order on every node):
//!
//! | command | reply | error |
//! |---|---|---|
//! | `put KEY VALUE` | `OK` | |
//! | `get KEY` | the value | `key not found: KEY` |
//! | `del KEY` | `OK` | `key not found: KEY` |
//! | `cas KEY EXPECTED NEW` | `OK` | `key not found: KEY`, `compare failed: KEY is CURRENT` |
//! | `scan PREFIX` | one `KEY VALUE` line per key, in key order | |
//!
//! Queries (answered by one node without touching the log) take `get KEY` and `scan [PREFIX]`.
//! Keys are single words; a value is the rest of the line and may contain spaces.

use std::collections::BTreeMap;
use waft_guest::{Context, StateMachine};

/// The state: an ordered map, so iteration and snapshots are canonical. Public so that the
/// guest's behaviour can be tested natively (`waft_guest::testing`).
#[derive(Default)]
pub struct Kv {
    entries: BTreeMap<String, String>,
}

const SNAPSHOT_MAGIC: &[u8; 4] = b"WKV1";

/// Splits off the first space-separated word.
fn word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.split_once(' ') {
        Some((head, rest)) => (head, rest),
        None => (text, ""),
    }
}

fn need<'a>(what: &str, value: &'a str, usage: &str) -> Result<&'a str, String> {
    if value.is_empty() {
        Err(format!("missing {what}; usage: {usage}"))
    } else {
        Ok(value)
    }
}

impl Kv {
    fn get(&self, key: &str) -> Result<Vec<u8>, String> {
        let key = need("KEY", key.trim(), "get KEY")?;
        self.entries
            .get(key)
            .map(|v| v.clone().into_bytes())
            .ok_or_else(|| format!("key not found: {key}"))
    }

    fn scan(&self, prefix: &str) -> Vec<u8> {
        let prefix = prefix.trim();
        let mut out = String::new();
        for (k, v) in self.entries.range(prefix.to_owned()..) {
            if !k.starts_with(prefix) {
                break;
            }
            out.push_str(k);
            out.push(' ');
            out.push_str(v);
            out.push('\n');
        }
        out.into_bytes()
    }
}

impl StateMachine for Kv {
    fn apply(&mut self, _ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(command).map_err(|_| "command is not UTF-8".to_owned())?;
        let (verb, rest) = word(text);
        match verb {
            "put" => {
                let (key, value) = word(rest);
                let key = need("KEY", key, "put KEY VALUE")?;
                self.entries.insert(key.to_owned(), value.to_owned());
                Ok(b"OK".to_vec())
            }
            "get" => self.get(rest),
            "del" => {
                let key = need("KEY", rest.trim(), "del KEY")?;
                match self.entries.remove(key) {
                    Some(_) => Ok(b"OK".to_vec()),
                    None => Err(format!("key not found: {key}")),
                }
            }
            "cas" => {
                let usage = "cas KEY EXPECTED NEW";
                let (key, rest) = word(rest);
                let (expected, new) = word(rest);
                let key = need("KEY", key, usage)?;
                let expected = need("EXPECTED", expected, usage)?;
                let current = self
                    .entries
                    .get_mut(key)
                    .ok_or_else(|| format!("key not found: {key}"))?;
                if current != expected {
                    return Err(format!("compare failed: {key} is {current}"));
                }
                *current = new.to_owned();
                Ok(b"OK".to_vec())
            }
            "scan" => Ok(self.scan(rest)),
            #[cfg(feature = "v2")]
            "version" => Ok(b"kv v2".to_vec()),
            "" => Err("empty command; try: put KEY VALUE".to_owned()),
            other => Err(format!(
                "unknown command {other:?}; expected put, get, del, cas or scan"
            )),
        }
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(request).map_err(|_| "query is not UTF-8".to_owned())?;
        match word(text) {
            ("get", key) => self.get(key),
            ("scan", prefix) => Ok(self.scan(prefix)),
            (other, _) => Err(format!(
                "unknown query {other:?}; queries are get KEY and scan [PREFIX]"
            )),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        // MAGIC, count, then (len, key, len, value) per entry in key order: canonical bytes.
        let mut out = SNAPSHOT_MAGIC.to_vec();
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (k, v) in &self.entries {
            for field in [k, v] {
                out.extend_from_slice(&(field.len() as u32).to_le_bytes());
                out.extend_from_slice(field.as_bytes());
            }
        }
        out
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        let mut input = Reader(snapshot);
        if input.take(4)? != SNAPSHOT_MAGIC {
            return Err("not a kv snapshot (bad magic)".to_owned());
        }
        let count = u64::from_le_bytes(input.take(8)?.try_into().map_err(|_| "bad count")?);
        let mut entries = BTreeMap::new();
        for _ in 0..count {
            let key = input.string()?;
            let value = input.string()?;
            entries.insert(key, value);
        }
        if !input.0.is_empty() {
            return Err("kv snapshot has trailing bytes".to_owned());
        }
        Ok(Kv { entries })
    }
}

/// A cursor over snapshot bytes that fails cleanly on truncation.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("kv snapshot is truncated".to_owned());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "bad length")?);
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "kv snapshot holds invalid UTF-8".to_owned())
    }
}

waft_guest::export!(Kv);
