//! waft: Raft consensus feeding a user-supplied WebAssembly state machine.
//!
//! # Layout
//!
//! - [`runtime`]: the guest runtime, the only module that touches wasmtime. Loads and validates
//!   components, runs them deterministically under fuel and memory limits, and rolls back any
//!   call that traps.
//! - [`verify`]: the determinism verifier behind `waft exec --verify`.
//! - [`cli`]: the `waft` command line (parsed arguments become calls into the library).
//!
//! ARCHITECTURE.md has the full code map and the invariants.

pub mod api;
pub mod audit;
pub mod auth;
pub mod autoremove;
pub mod cli;
pub mod discovery;
pub mod etcd;
pub mod metrics;
pub mod node;
pub mod pb;
pub mod raft;
pub mod runtime;
pub mod storage;
mod sync;
pub mod tls;
pub mod trial;
pub mod verify;
