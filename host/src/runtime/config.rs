//! Limits and settings of the guest runtime.

use std::path::PathBuf;

/// Resource limits applied to every guest call, identically on every node.
///
/// Limits that can change the outcome of a call (fuel, memory, tables, reply size) are part of
/// the engine fingerprint ([`super::Runtime::fingerprint`]): nodes must agree on them, or the
/// same entry could trap on one replica and succeed on another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest module accepted, in bytes.
    pub max_module_bytes: usize,
    /// Largest linear memory a guest may grow to, in bytes (per memory).
    pub max_memory_bytes: usize,
    /// Largest table a guest may grow to, in elements.
    pub max_table_elements: usize,
    /// Fuel for one `apply` (or one `apply-batch` call as a whole). Roughly one unit per wasm
    /// instruction: a kv `put` costs ~4,400.
    pub fuel_per_apply: u64,
    /// Fuel for one `query`.
    pub fuel_per_query: u64,
    /// Fuel for one `snapshot` or `restore`, which walk the whole state.
    pub fuel_per_snapshot: u64,
    /// Largest reply (`apply` or `query`) a guest may return, in bytes. A larger reply traps
    /// and the call is rolled back.
    pub max_reply_bytes: usize,
    /// Bytes of stdout/stderr per call forwarded to the host's logs; the rest is dropped.
    pub max_output_bytes_per_call: usize,
    /// Lines a guest may pass to `host.log` per call; the rest are counted and dropped.
    pub max_log_lines_per_call: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_module_bytes: 64 << 20,
            max_memory_bytes: 256 << 20,
            max_table_elements: 200_000,
            fuel_per_apply: 1_000_000_000,
            fuel_per_query: 1_000_000_000,
            fuel_per_snapshot: 50_000_000_000,
            max_reply_bytes: 4 << 20,
            max_output_bytes_per_call: 16 << 10,
            max_log_lines_per_call: 64,
        }
    }
}

/// When a guest's instance is *rebased*: replaced by a fresh instance restored from its own
/// snapshot, which bounds the journal that trap recovery and snapshot files replay.
///
/// A rebase is taken after `entries` journaled calls or `bytes` of applied commands, whichever
/// comes first. The decision reads only the journal, so every replica rebases at the same entry
/// and instance histories stay equal (see `Guest`); the policy is part of the engine
/// fingerprint.
///
/// A rebase costs as much as the state is large, so a large state is rebased less often: the
/// entry count that triggers one is at least one entry per [`CHECKPOINT_BYTES_PER_ENTRY`] bytes
/// of the last base. Rebasing then costs a bounded amount per applied entry whatever the state's
/// size, and replaying the journal costs about what restoring the base does. `bytes` still
/// bounds the journal's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Entries applied since the last checkpoint that trigger a new one (at least; see above).
    pub entries: usize,
    /// Bytes of commands applied since the last checkpoint that trigger a new one.
    pub bytes: usize,
}

/// Checkpoint bytes per journal entry a checkpoint may wait for (see [`CheckpointPolicy`]).
///
/// A rebase costs about what restoring the state does (for the kv guest, roughly one apply per
/// 45 bytes of snapshot); waiting one entry per 16 bytes keeps that below a third of an apply
/// per entry, where 64 made it about one whole apply (`benches/guest_apply.rs`: the default
/// policy ran puts at 2.07x the never-rebasing cost). The price is a longer journal to replay
/// after a trap or on a snapshot install, bounded by the policy's `bytes`.
pub const CHECKPOINT_BYTES_PER_ENTRY: usize = 16;

impl CheckpointPolicy {
    /// Whether a journal of `entries` entries and `bytes` command bytes, after a checkpoint of
    /// `checkpoint_bytes`, calls for a new checkpoint.
    pub fn due(&self, entries: usize, bytes: usize, checkpoint_bytes: usize) -> bool {
        entries
            >= self
                .entries
                .max(checkpoint_bytes / CHECKPOINT_BYTES_PER_ENTRY)
            || bytes >= self.bytes
    }
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            entries: 10_000,
            bytes: 64 << 20,
        }
    }
}

/// Everything needed to build a [`super::Runtime`].
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Resource limits per call.
    pub limits: Limits,
    /// When guest instances are rebased (see [`CheckpointPolicy`]).
    pub checkpoints: CheckpointPolicy,
    /// Where compiled components are kept between runs (`None`: compile on every start).
    pub cache_dir: Option<PathBuf>,
    /// With a `cache_dir`: compiled code kept in memory after nothing uses it any more, at
    /// most this many bytes, the least recently loaded leaving first (0: none; a module that
    /// serves again comes back from the disk cache in milliseconds).
    pub compiled_cache_bytes: usize,
}
