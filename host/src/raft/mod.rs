//! Raft: the type configuration, the gRPC network between nodes and its server side.

pub mod network;
pub mod service;
pub mod types;

pub use network::{NetConfig, NetworkFactory};
pub use service::{Raft, RaftService, SnapshotLimits};
