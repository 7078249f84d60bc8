//! What this replica observed while applying: counters, latencies and snapshot figures for
//! metrics. Local observations: never replicated, never in snapshots.

/// Snapshots this node built and installed (local observations, for metrics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotStats {
    /// Snapshots built.
    pub built: u64,
    /// Size of the last one built, bytes.
    pub last_built_bytes: u64,
    /// Time the last build took (capture and file), seconds.
    pub last_build_seconds: f64,
    /// Snapshots installed (received from a leader, or loaded at start).
    pub installed: u64,
    /// Size of the last one installed, bytes.
    pub last_installed_bytes: u64,
    /// Time the last install took (loading every service's state), seconds.
    pub last_install_seconds: f64,
}

/// Upper bounds (µs) of the apply-latency histogram buckets.
pub const APPLY_BUCKETS_US: [u64; 10] = [5, 10, 25, 50, 100, 250, 500, 1000, 5000, 25000];

/// One service as the metrics endpoint shows it.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    /// Service name.
    pub name: String,
    /// Active version.
    pub version: u32,
    /// Fuel its guest consumed, all calls and replays included.
    pub fuel: u64,
    /// Times its guest was rebuilt after a trap.
    pub recoveries: u64,
    /// Calls on its guest that hit a host fault (contained as traps).
    pub host_faults: u64,
    /// Linear memory its live instance holds on this node, bytes.
    pub memory_bytes: u64,
    /// Compiled code of the module it runs, bytes (shared with any other service or version
    /// running the same module).
    pub code_bytes: u64,
    /// Its instance history kept in memory (base state and journal), bytes.
    pub history_bytes: u64,
    /// Pending guest timers.
    pub pending_timers: u64,
    /// Counters and apply latency.
    pub stats: ServiceStats,
}

/// What this node saw a service's guest do (for metrics; not replicated state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Commands applied with a reply.
    pub applied: u64,
    /// Commands the guest rejected.
    pub rejected: u64,
    /// Commands that trapped (and were rolled back).
    pub trapped: u64,
    /// Apply latency per command: counts per bucket of [`APPLY_BUCKETS_US`], then overflow.
    pub latency_buckets: [u64; 11],
    /// Sum of apply latencies, µs.
    pub latency_sum_us: u64,
    /// Timers delivered (`fire` answered `ok`).
    pub timers_fired: u64,
    /// Timers whose delivery failed (a trap, `err`, effects refused): dropped.
    pub timer_failures: u64,
}
