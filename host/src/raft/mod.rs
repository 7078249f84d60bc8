//! Raft: the type configuration, the gRPC network between nodes and its server side.

pub mod types;
