//! The guest testing kit: `waft_guest::testing` runs one script against a guest type natively
//! and against its built component in the real runtime (`waft::testing::Component`), and both
//! must answer alike; the harness's checks (snapshot round trip, a rejection that changed the
//! state) catch what they claim to.

use waft::testing::Component;
use waft_guest::testing::{Harness, Native, Target};
use waft_guest::{Context, StateMachine};
use waft_testkit::guests::EXAMPLE_KV;

/// Everything a test of the kv guest would check, written once for any target.
fn kv_script<T: Target>(h: &mut Harness<T>) -> Vec<Result<Vec<u8>, String>> {
    let mut out = Vec::new();
    for command in [
        "put a 1",
        "put b two words",
        "get a",
        "cas a 1 2",
        "cas a 1 3",
        "del nothing",
        "frobnicate",
        "del b",
    ] {
        out.push(h.apply(command));
    }
    h.advance(60_000);
    h.new_term();
    out.push(h.apply("put c 3"));
    out.push(h.query("scan"));
    out.push(h.query("get a"));
    h.assert_snapshot_roundtrip();
    out.push(h.query("scan"));
    out.push(h.apply("put d 4"));
    out.push(Ok(h.snapshot()));
    out
}

#[test]
fn one_script_runs_the_kv_guest_natively_and_in_the_runtime_alike() {
    let native = kv_script(&mut Harness::new(Native::<kv::Kv>::default()));
    let wasm = kv_script(&mut Harness::new(
        Component::load(EXAMPLE_KV).expect("the kv component loads"),
    ));
    assert_eq!(native.len(), wasm.len());
    for (i, (n, w)) in native.iter().zip(&wasm).enumerate() {
        match (n, w) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "step {i}"),
            // The runtime prefixes a rejection with its kind; the guest's words are the same.
            (Err(a), Err(b)) => assert!(b.contains(a.as_str()), "step {i}: {a:?} vs {b:?}"),
            _ => panic!("step {i} differs: native {n:?}, component {w:?}"),
        }
    }
    assert_eq!(native[2], Ok(b"1".to_vec()));
    assert!(
        native[4]
            .as_ref()
            .is_err_and(|e| e.contains("compare failed"))
    );
    assert_eq!(native[9], Ok(b"a 2\nc 3\n".to_vec()));
}

/// A guest whose rejection leaves a change behind, and one whose snapshot forgets state.
#[derive(Default)]
struct Sloppy {
    seen: u64,
    forgets: bool,
}

impl StateMachine for Sloppy {
    fn apply(&mut self, _: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        self.seen += 1;
        if command == b"forget" {
            self.forgets = true;
        }
        if command == b"bad" {
            return Err("refused".into());
        }
        Ok(Vec::new())
    }
    fn query(&self, _: &[u8]) -> Result<Vec<u8>, String> {
        Ok(self.seen.to_string().into_bytes())
    }
    fn snapshot(&self) -> Vec<u8> {
        let mut out = self.seen.to_le_bytes().to_vec();
        out.push(u8::from(self.forgets));
        out
    }
    fn restore(s: &[u8]) -> Result<Self, String> {
        let forgets = s.get(8) == Some(&1);
        let seen = u64::from_le_bytes(s[..8].try_into().map_err(|_| "short")?);
        // The bug: a guest that "forgets" restores without its count.
        Ok(Sloppy {
            seen: if forgets { 0 } else { seen },
            forgets,
        })
    }
}

#[test]
fn the_harness_catches_a_rejection_that_changed_state_and_a_lossy_snapshot() {
    let mut h = Harness::new(Native::<Sloppy>::default());
    h.apply("ok").expect("applied");
    let changed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.apply("bad")));
    let message = changed
        .expect_err("caught")
        .downcast::<String>()
        .expect("a message");
    assert!(
        message.contains("returned Err but changed the state"),
        "{message}"
    );

    let mut h = Harness::new(Native::<Sloppy>::default());
    h.apply("ok").expect("applied");
    h.assert_snapshot_roundtrip();
    h.apply("forget").expect("applied");
    let lossy = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.assert_snapshot_roundtrip()
    }));
    let message = lossy
        .expect_err("caught")
        .downcast::<String>()
        .expect("a message");
    assert!(
        message.contains("snapshots to different bytes"),
        "{message}"
    );
}
