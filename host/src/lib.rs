//! waft: Raft consensus feeding a user-supplied WebAssembly state machine.
//!
//! # Layout
//!
//! Layers, lowest first; a module uses only modules of lower layers. This list is the one
//! source: `tests/all/tidy.rs` reads the layers from it (the linked names of each item),
//! checks every `crate::` path against them, and checks that ARCHITECTURE.md lists the same.
//!
//! 1. [`sync`], [`pb`], [`auth`], [`tls`], [`discovery`], [`version`]: leaves (lock helpers,
//!    generated gRPC code and codecs, tokens, TLS settings, mDNS, releases and cluster versions).
//! 2. [`runtime`]: the guest runtime, the only module that touches wasmtime.
//! 3. [`verify`], [`trial`]: the determinism verifier and try-before-deploy, on the runtime.
//! 4. [`types`]: the Raft vocabulary (type config, requests, responses, the leader clock).
//! 5. [`storage`]: the Raft log (WAL or redb), the state machine, snapshots.
//! 6. [`budget`]: the node's guest memory budget, over the services the state machine runs.
//! 7. [`Raft`]: the node's Raft handle, openraft over waft's types and storage.
//! 8. [`raft`]: the Raft transport between nodes (gRPC client and server).
//! 9. [`audit`], [`autoremove`], [`purge`], [`timers`], [`upgrade`]: policies over Raft
//!    (divergence audits, removing dead voters, purging the log, proposing the delivery of due
//!    guest timers, raising the cluster version).
//! 10. [`api`]: the client API (`waft.v1`).
//! 11. [`etcd`], [`metrics`]: the etcd endpoint and the Prometheus endpoint, on the API.
//! 12. [`node`]: one node, assembled.
//! 13. [`cli`]: the `waft` command line.
//!
//! ARCHITECTURE.md has the full code map and the invariants.

pub mod api;
pub mod audit;
pub mod auth;
pub mod autoremove;
pub mod budget;
pub mod cli;
pub mod discovery;
pub mod etcd;
pub mod metrics;
pub mod node;
pub mod pb;
pub mod purge;
pub mod raft;
pub mod runtime;
pub mod storage;
mod sync;
pub mod timers;
pub mod tls;
pub mod trial;
pub mod types;
pub mod upgrade;
pub mod verify;
pub mod version;

/// Unit-test a guest under the real runtime: see `waft_guest::testing`.
pub use runtime::testing;

/// The node's Raft handle: openraft over waft's [`types`] and [`storage`].
pub type Raft = openraft::Raft<types::TypeConfig, storage::StateMachineStore>;
