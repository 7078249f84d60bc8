//! Durable state: the Raft log in redb, the state machine and its snapshot files.
//! The only module that touches redb.

pub mod engine;
pub mod events;
pub mod log_store;
pub mod snapshot;
pub mod state_machine;

pub mod wal;
pub use engine::LogEngine;
pub use log_store::{DeployHook, LogReader, LogStore};
pub use snapshot::SnapshotFile;
pub use state_machine::{
    APPLY_BUCKETS_US, AuditStatus, DigestReply, Divergence, HealRecord, HealReply, HealRequest,
    Healer, QueryError, ServiceInfo, ServiceMetrics, ServiceStats, SnapshotStats, StateHandle,
    StateMachineStore,
};
pub use wal::WalLog;
