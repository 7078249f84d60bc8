//! waft's integration tests: one test binary, one module per area.
//!
//! Tests run real parts: guest components built from `examples/guests` and `tests/guests` by
//! the `waft-testkit` build script, the real wasmtime engine, the real `waft` binary.

mod api;
mod audit;
mod auth;
mod autoremove;
mod backup;
mod bad_input;
mod bench;
mod chaos;
mod cli;
mod clients;
mod cluster;
mod compat;
mod compiled;
mod dashboards;
mod determinism;
mod docs;
mod etcd;
mod etcd_concurrency;
mod etcd_library;
mod fuzz;
mod hostile;
mod hotswap;
mod identity;
mod languages;
mod memory;
mod metrics;
mod modules;
mod process;
mod progress;
mod rolling;
mod routing;
mod runtime;
mod rust_client;
mod sandbox;
mod session;
mod storage;
mod support;
mod testing_kit;
mod tidy;
mod tidy_rings;
mod timers;
mod tls;
mod upgrade;
mod watch;
