//! The generated types and stubs of `proto/api.proto` (`waft.v1`): every message, the
//! `waft_client::WaftClient` stub and the `waft_server` the node implements.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

tonic::include_proto!("waft.v1");

/// The encoded descriptors of `waft.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("waft_api_descriptor");
