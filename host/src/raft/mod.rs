//! The Raft transport: the gRPC network between nodes (client side), its server side, the
//! identity checks on every Raft message and the audit/heal RPCs between nodes. The vocabulary
//! (type config, requests, responses) is [`crate::types`].

pub mod append_gate;
pub mod identity;
pub mod modules;
pub mod network;
pub mod peer_audit;
pub mod peer_status;
pub mod record;
pub mod rtt;
pub mod service;

pub use identity::Identity;
pub use modules::PeerModules;
pub use network::{NetConfig, NetworkFactory};
pub use service::{RaftService, SnapshotLimits};
