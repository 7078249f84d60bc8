//! A guest that reads everything that could differ between replicas: the wall clock, the
//! monotonic clock, random bytes (`getrandom` directly, and `rand`'s thread-local generator,
//! seeded once per instance) and HashMap iteration order. waft must make all of it
//! deterministic, so two instances fed the same entries end with identical snapshots.
//!
//! Every command records what the guest observed; `snapshot` returns the whole record.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use waft_guest::{Context, StateMachine};

#[derive(Default)]
struct Observer {
    record: Vec<String>,
    map: HashMap<String, u64>,
    first_instant: Option<Instant>,
}

impl StateMachine for Observer {
    fn apply(&mut self, ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let now = Instant::now();
        let since_first = now.duration_since(*self.first_instant.get_or_insert(now)).as_millis();
        // HashMap::new() draws fresh random keys; iteration order depends on them.
        self.map.insert(String::from_utf8_lossy(command).into_owned(), ctx.index);
        let mut scratch: HashMap<u64, u64> = HashMap::new();
        for i in 0..16 {
            scratch.insert(i, i * i);
        }
        let order: Vec<String> = scratch.keys().map(|k| k.to_string()).collect();
        let drawn: u64 = rand::Rng::random(&mut rand::rng());
        let direct = getrandom::u64().map_err(|e| e.to_string())?;
        let map_order: Vec<String> = self.map.keys().cloned().collect();
        let line = format!(
            "index={} ctx_ms={} wall_ms={wall} mono_ms={since_first} rng={drawn} getrandom={direct} scratch=[{}] map=[{}]",
            ctx.index,
            ctx.timestamp_ms,
            order.join(","),
            map_order.join(",")
        );
        self.record.push(line.clone());
        Ok(line.into_bytes())
    }

    fn query(&self, _request: &[u8]) -> Result<Vec<u8>, String> {
        Ok(self.record.join("\n").into_bytes())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.record.join("\n").into_bytes()
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(snapshot).map_err(|_| "not UTF-8")?;
        Ok(Observer {
            record: text.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect(),
            ..Observer::default()
        })
    }
}

waft_guest::export!(Observer);
