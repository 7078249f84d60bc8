//! A guest that exports waft's state machine but also imports an interface waft does not
//! provide (`test:dial/dialer`): loading it must fail with a clear message naming the import.

wit_bindgen::generate!({
    path: "../../../wit",
    inline: "
        package test:dial;
        interface dialer { dial: func(addr: string) -> string; }
        world guest {
            import dialer;
            export waft:fsm/state-machine@0.1.0;
        }
    ",
    world: "test:dial/guest",
    generate_all,
});

use exports::waft::fsm::state_machine::{ApplyContext, Entry, Guest};

struct Dial;

impl Guest for Dial {
    fn apply(_context: ApplyContext, command: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(test::dial::dialer::dial(&String::from_utf8_lossy(&command)).into_bytes())
    }
    fn apply_batch(entries: Vec<Entry>) -> Vec<Result<Vec<u8>, String>> {
        entries
            .into_iter()
            .map(|e| Self::apply(e.context, e.command))
            .collect()
    }
    fn query(_request: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
    fn snapshot() -> Vec<u8> {
        Vec::new()
    }
    fn restore(_snapshot: Vec<u8>) -> Result<(), String> {
        Ok(())
    }
}

export!(Dial);
