//! The wasmtime engine, configured for deterministic execution, and its fingerprint.

use super::config::{CheckpointPolicy, Limits};
use super::functions::FunctionCache;
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use wasmtime::{Config, Engine, OptLevel};

/// The wasmtime release this host is built against. Pinned in Cargo.toml with `=`; it is part
/// of the fingerprint because code generation may change between releases.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Builds the engine every guest runs on.
///
/// Determinism (wasmtime's "deterministic execution" guidance): NaNs are canonicalized, relaxed
/// SIMD gives its deterministic results, threads and shared memory are off, and execution is
/// bounded by fuel (which counts instructions, unlike epochs, which count time).
/// `concurrency_support` is off: the component-model async machinery about doubles the cost of
/// a call and guests have no use for it.
///
/// With a function cache, Cranelift keeps each compiled function there, so a new version of a
/// module compiles only what changed.
///
/// Every engine built here has the same configuration, so code compiled by one loads into any
/// other: the runtime compiles with an engine of its own that it drops afterwards (see
/// `module::compile`).
pub fn build(functions: Option<Arc<FunctionCache>>) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    if let Some(cache) = functions {
        config.enable_incremental_compilation(cache)?;
    }
    config
        .wasm_component_model(true)
        .consume_fuel(true)
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(true)
        .relaxed_simd_deterministic(true)
        .concurrency_support(false)
        .epoch_interruption(false)
        .parallel_compilation(true)
        .cranelift_opt_level(OptLevel::Speed);
    Engine::new(&config)
}

/// Names the configuration that decides what a guest call does: the wasmtime release, the
/// determinism settings above and the limits that can make a call trap. Two nodes whose
/// fingerprints differ may disagree on the outcome of an entry, so they must not share a log.
/// The checkpoint policy is in it too: it decides at which entries a guest's instance is
/// replaced by a fresh one, which is part of every instance's history (see `Guest`).
pub fn fingerprint(limits: &Limits, checkpoints: &CheckpointPolicy) -> String {
    let mut h = Sha256::new();
    h.update(b"waft-engine-v2\0instance-history\0");
    h.update(WASMTIME_VERSION.as_bytes());
    h.update(b"\0nan-canonical,relaxed-simd-deterministic,no-threads,fuel\0");
    for n in [
        limits.max_memory_bytes as u64,
        limits.max_table_elements as u64,
        limits.fuel_per_apply,
        limits.fuel_per_query,
        limits.fuel_per_snapshot,
        limits.max_reply_bytes as u64,
        checkpoints.entries as u64,
        checkpoints.bytes as u64,
        super::config::CHECKPOINT_BYTES_PER_ENTRY as u64,
    ] {
        h.update(n.to_le_bytes());
    }
    let digest = h.finalize();
    format!("wasmtime-{WASMTIME_VERSION}-{}", hex::encode(&digest[..8]))
}

/// A key for compiled artifacts: they load only into an engine with a compatible configuration
/// (wasmtime's own compatibility hash) of the same wasmtime release.
pub fn artifact_key(engine: &Engine) -> String {
    // SipHash with fixed keys: stable for a given build, which is all a local cache needs.
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    WASMTIME_VERSION.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}
