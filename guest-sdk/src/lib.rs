//! Write a [waft](https://example.invalid/waft) state machine as a plain Rust type.
//!
//! waft replicates a log of commands with Raft and feeds every committed command, in order, to a
//! WebAssembly component on every node. This crate turns a Rust type into such a component:
//! implement [`StateMachine`] (bytes in, bytes out) or [`json::JsonStateMachine`] (typed
//! commands as JSON), then call [`export!`] once.
//!
//! ```ignore
//! use std::collections::BTreeMap;
//! use waft_guest::{Context, StateMachine};
//!
//! #[derive(Default)]
//! struct Registers(BTreeMap<String, String>);
//!
//! impl StateMachine for Registers {
//!     fn apply(&mut self, _ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
//!         let text = std::str::from_utf8(command).map_err(|_| "command is not UTF-8")?;
//!         let (key, value) = text.split_once('=').ok_or("expected KEY=VALUE")?;
//!         let old = self.0.insert(key.to_owned(), value.to_owned());
//!         Ok(old.unwrap_or_default().into_bytes())
//!     }
//!     fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
//!         let key = std::str::from_utf8(request).map_err(|_| "request is not UTF-8")?;
//!         self.0.get(key).map(|v| v.clone().into_bytes()).ok_or_else(|| format!("no key {key}"))
//!     }
//!     fn snapshot(&self) -> Vec<u8> {
//!         // A BTreeMap iterates in key order, so this encoding is canonical.
//!         self.0.iter().map(|(k, v)| format!("{k}={v}\n")).collect::<String>().into_bytes()
//!     }
//!     fn restore(snapshot: &[u8]) -> Result<Self, String> {
//!         let text = std::str::from_utf8(snapshot).map_err(|_| "snapshot is not UTF-8")?;
//!         let mut map = BTreeMap::new();
//!         for line in text.lines() {
//!             let (k, v) = line.split_once('=').ok_or("corrupt snapshot line")?;
//!             map.insert(k.to_owned(), v.to_owned());
//!         }
//!         Ok(Registers(map))
//!     }
//! }
//!
//! waft_guest::export!(Registers);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component to check (`waft check`), try (`waft exec`)
//! and deploy (`waft deploy`).
//!
//! # Determinism
//!
//! Every replica must reach the same state. Use only the command, the [`Context`] and your own
//! state; keep collections that you serialize ordered (`BTreeMap`, not `HashMap`); never read
//! files, the network or the environment (waft does not provide them). WASI clocks read the
//! entry's leader-assigned timestamp and WASI randomness is seeded from the module and the log
//! index, so both are deterministic, but [`Context::timestamp_ms`] says what you mean more
//! plainly.

#![deny(missing_docs)]

/// The bindings generated from waft's WIT package, version 0.2.0 (`wit/v0.2/fsm.wit`). Used by
/// [`export!`]. A guest that sets no timers and emits no events imports neither, and runs like
/// a 0.1.0 guest (batched applies included).
#[doc(hidden)]
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/v0.2/fsm.wit",
        world: "guest",
        pub_export_macro: true,
        export_macro_name: "__export_guest",
        default_bindings_module: "waft_guest::bindings",
    });
}

pub mod events;
#[cfg(feature = "json")]
pub mod json;
pub mod testing;
pub mod timers;

use std::cell::RefCell;

/// The severity of a line passed to [`log`].
pub use bindings::waft::fsm::host::Level;
/// Deterministic facts about the entry being applied: log index, term and the leader's timestamp.
pub use bindings::waft::fsm::types::ApplyContext as Context;

/// A replicated state machine: the type a waft guest is made of.
///
/// An implementation must be deterministic: the same sequence of `apply` calls must produce the
/// same state and the same replies on every replica.
pub trait StateMachine: Default + 'static {
    /// Applies one committed command and returns the reply for the client.
    ///
    /// Return `Err` to reject the command (the message goes to the client); the state must then
    /// be unchanged. A panic is also safe: the host rolls back every effect of the call.
    fn apply(&mut self, ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String>;

    /// Takes the timer `key`, set earlier with [`timers::set`], now due: `ctx` is the entry
    /// that delivers it (its timestamp is at or after the due time). The timer is no longer
    /// pending, so it can be set again (a periodic timer). `Err` (the state must then be
    /// unchanged) or a panic drops the timer and undoes what the call did.
    ///
    /// The default refuses: a guest that sets timers implements it.
    fn fire(&mut self, ctx: &Context, key: &str, payload: &[u8]) -> Result<(), String> {
        let _ = (ctx, payload);
        Err(format!("this guest sets no timers (timer {key:?})"))
    }

    /// Answers a read-only request. It cannot change state: it gets `&self`.
    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String>;

    /// Serializes the whole state canonically: equal states must give equal bytes.
    fn snapshot(&self) -> Vec<u8>;

    /// Builds a state from bytes produced by [`StateMachine::snapshot`].
    ///
    /// On `Err` the current state stays in place (the SDK only swaps on success).
    fn restore(snapshot: &[u8]) -> Result<Self, String>;
}

/// Writes a line into the host's logs (rate-limited by the host; it never affects state).
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    bindings::waft::fsm::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (level, message);
}

/// Holds the one instance of a guest's state. Used by [`export!`]; not meant to be named.
#[doc(hidden)]
pub struct Slot<T>(RefCell<Option<T>>);

impl<T: StateMachine> Slot<T> {
    /// An empty slot; the state is created with `Default` on first use.
    pub const fn new() -> Self {
        Slot(RefCell::new(None))
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut guard = self.0.borrow_mut();
        f(guard.get_or_insert_with(T::default))
    }

    /// Forwards `apply`.
    pub fn apply(&self, ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        self.with(|s| s.apply(ctx, command))
    }

    /// Forwards `apply-batch` as a loop over `apply`, which is what the contract requires.
    pub fn apply_batch(
        &self,
        entries: Vec<bindings::waft::fsm::types::Entry>,
    ) -> Vec<Result<Vec<u8>, String>> {
        self.with(|s| {
            entries
                .iter()
                .map(|e| s.apply(&e.context, &e.command))
                .collect()
        })
    }

    /// Forwards `fire`.
    pub fn fire(&self, ctx: &Context, key: &str, payload: &[u8]) -> Result<(), String> {
        self.with(|s| s.fire(ctx, key, payload))
    }

    /// Forwards `query`.
    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.with(|s| s.query(request))
    }

    /// Forwards `snapshot`.
    pub fn snapshot(&self) -> Vec<u8> {
        self.with(|s| s.snapshot())
    }

    /// Forwards `restore`, replacing the state only when the snapshot was understood.
    pub fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let fresh = T::restore(snapshot)?;
        *self.0.borrow_mut() = Some(fresh);
        Ok(())
    }
}

impl<T> std::fmt::Debug for Slot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl<T: StateMachine> Default for Slot<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Exports a [`StateMachine`] type as the component's `waft:fsm/state-machine` implementation.
///
/// Call it once, at the top level of the guest crate: `waft_guest::export!(MyType);`
#[macro_export]
macro_rules! export {
    ($ty:ty) => {
        #[doc(hidden)]
        #[allow(dead_code)]
        struct __WaftGuestExport;

        ::std::thread_local! {
            #[allow(dead_code)]
            static __WAFT_STATE: $crate::Slot<$ty> = const { $crate::Slot::new() };
        }

        impl $crate::bindings::exports::waft::fsm::state_machine::Guest for __WaftGuestExport {
            fn apply(
                context: $crate::Context,
                command: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                __WAFT_STATE.with(|s| s.apply(&context, &command))
            }
            fn apply_batch(
                entries: ::std::vec::Vec<$crate::bindings::waft::fsm::types::Entry>,
            ) -> ::std::vec::Vec<::std::result::Result<::std::vec::Vec<u8>, ::std::string::String>>
            {
                __WAFT_STATE.with(|s| s.apply_batch(entries))
            }
            fn fire(
                context: $crate::Context,
                key: ::std::string::String,
                payload: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                __WAFT_STATE.with(|s| s.fire(&context, &key, &payload))
            }
            fn query(
                request: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                __WAFT_STATE.with(|s| s.query(&request))
            }
            fn snapshot() -> ::std::vec::Vec<u8> {
                __WAFT_STATE.with(|s| s.snapshot())
            }
            fn restore(
                snapshot: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                __WAFT_STATE.with(|s| s.restore(&snapshot))
            }
        }

        // Only a WebAssembly build exports the world; natively (a guest's unit tests with
        // `waft_guest::testing`) the type is used directly.
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_guest!(__WaftGuestExport with_types_in $crate::bindings);
    };
}
