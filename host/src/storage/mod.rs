//! Durable state: the Raft log (an append-only WAL, `wal.rs`, or redb, `redb_log.rs`), the
//! state machine and its snapshot files. The only module that touches redb.

pub mod codec;
pub mod compiled;
pub mod engine;
pub mod events;
pub mod modules;
pub mod redb_log;
pub mod snapshot;
pub mod state_machine;
pub mod wal;

pub use engine::{DeployHook, DeployedModule, LogEngine};
pub use modules::{ModulePeers, ModuleStore};
pub use redb_log::{LogReader, RedbLog};
pub use snapshot::SnapshotFile;
pub use state_machine::{
    APPLY_BUCKETS_US, AuditStatus, DigestReply, Divergence, HealRecord, HealReply, HealRequest,
    Healer, QueryError, ServiceInfo, ServiceMetrics, ServiceStats, SnapshotStats, StateHandle,
    StateMachineStore,
};
pub use wal::{LogMemory, WalLog};
