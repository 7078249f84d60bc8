//! Raft: the type configuration, the gRPC network between nodes and its server side.

pub mod identity;
pub mod network;
pub mod peer_audit;
pub mod service;
pub mod types;

pub use identity::Identity;
pub use network::{NetConfig, NetworkFactory};
pub use service::{Raft, RaftService, SnapshotLimits};
