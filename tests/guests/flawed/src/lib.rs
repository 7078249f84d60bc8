//! A guest with the mistakes `waft exec --verify` must catch, one per command:
//!
//! - `gen`: the next value of a generator seeded when the instance starts, not in the snapshot;
//! - `global`: a counter kept in a global that `snapshot` leaves out;
//! - `map KEY`: KEY put in a `HashMap` that `snapshot` writes in iteration order (not canonical:
//!   `restore` reserves room up front, so a restored map has more buckets and another order);
//! - `keep X`: X kept in a `BTreeSet` (deterministic), for contrast.
//!
//! The query `bump` changes the hidden counter (a query that mutates); any other query reads.
//! Replicas running it must still agree: every replica's instance goes through the same calls.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use waft_guest::{Context, StateMachine};

static GENERATOR: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Flawed {
    kept: BTreeSet<String>,
    map: HashMap<String, u64>,
}

fn next_generated() -> u64 {
    let mut x = GENERATOR.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    GENERATOR.store(x, Ordering::Relaxed);
    x
}

impl StateMachine for Flawed {
    fn apply(&mut self, ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(command).map_err(|_| "not UTF-8")?;
        let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
        let reply = match verb {
            "gen" => next_generated().to_string(),
            "global" => (COUNTER.fetch_add(1, Ordering::Relaxed) + 1).to_string(),
            "map" => {
                self.map.insert(arg.to_owned(), ctx.index);
                let keys: Vec<&str> = self.map.keys().map(String::as_str).collect();
                keys.join(",")
            }
            "keep" => {
                self.kept.insert(arg.to_owned());
                "kept".to_owned()
            }
            other => return Err(format!("unknown command {other:?}")),
        };
        Ok(reply.into_bytes())
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        if request == b"bump" {
            COUNTER.fetch_add(1, Ordering::Relaxed);
        }
        Ok(format!("kept={} count={}", self.kept.len(), COUNTER.load(Ordering::Relaxed)).into_bytes())
    }

    fn snapshot(&self) -> Vec<u8> {
        let kept: Vec<&str> = self.kept.iter().map(String::as_str).collect();
        let map: Vec<String> = self.map.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}\n{}", kept.join(","), map.join(",")).into_bytes()
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(snapshot).map_err(|_| "not UTF-8")?;
        let (kept, map) = text.split_once('\n').unwrap_or((text, ""));
        // Room for growth, as real guests often reserve: the order now depends on history.
        let mut restored = HashMap::with_capacity(256);
        restored.extend(
            map.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(0))),
        );
        Ok(Flawed {
            kept: kept.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
            map: restored,
        })
    }
}

waft_guest::export!(Flawed);
