//! A `waft:fsm@0.1.0` guest (its own bindings of `wit/fsm.wit`, as guests built before 0.2.0
//! have): it keeps whatever snapshot it was restored with and hands it back, so a service can
//! be hot-swapped to it and back without losing state. Its commands append to the state.

wit_bindgen::generate!({
    path: "../../../wit/fsm.wit",
    world: "guest",
    generate_all,
});

use exports::waft::fsm::state_machine::{ApplyContext, Entry, Guest};
use std::cell::RefCell;

thread_local! {
    static STATE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

struct Legacy;

impl Guest for Legacy {
    fn apply(_context: ApplyContext, command: Vec<u8>) -> Result<Vec<u8>, String> {
        STATE.with(|s| s.borrow_mut().extend_from_slice(&command));
        Ok(b"legacy".to_vec())
    }
    fn apply_batch(entries: Vec<Entry>) -> Vec<Result<Vec<u8>, String>> {
        entries
            .into_iter()
            .map(|e| Self::apply(e.context, e.command))
            .collect()
    }
    fn query(_request: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(b"legacy".to_vec())
    }
    fn snapshot() -> Vec<u8> {
        STATE.with(|s| s.borrow().clone())
    }
    fn restore(snapshot: Vec<u8>) -> Result<(), String> {
        STATE.with(|s| *s.borrow_mut() = snapshot);
        Ok(())
    }
}

export!(Legacy);
