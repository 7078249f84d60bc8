//! Support for waft's integration tests and benchmarks.
//!
//! The guests are built by `build.rs`; [`guests`] holds the path of each component.

/// Paths of the guest components, one constant per guest crate.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// Reads a guest component built by `build.rs`.
pub fn wasm(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read guest {path}: {e}"))
}
