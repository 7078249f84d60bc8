//! Generated gRPC code and the conversions between it and waft's types. Prost types stop here:
//! other modules see the service stubs and our own types.

pub mod upload;

/// The protobuf codec every waft service uses (shared with the client crate).
pub use waft_client::codec;
/// The calling side of a `Session` stream (shared with the client crate).
pub use waft_client::pipe as session;

/// `proto/raft.proto`: node-to-node Raft traffic.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod raft {
    tonic::include_proto!("waft.raft.v1");
}

/// `proto/api.proto`: the client API, generated once, in the client crate.
pub use waft_client::proto as api;

/// `proto/etcd.proto`: the part of etcd's v3 KV API waft speaks (as a client, for now).
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

pub use waft_client::copy_status;

/// The protobuf message trait, for code outside `pb/` that is generic over messages.
pub use prost::Message;

/// `tag` followed by `message`'s protobuf encoding (how the etcd endpoint hands an etcd request
/// to the etcd-kv guest).
pub fn tagged(tag: u8, message: &impl prost::Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + message.encoded_len());
    out.push(tag);
    message
        .encode(&mut out)
        .expect("a Vec grows to fit any message");
    out
}

/// A deploy upload: the header, then the module in 1 MiB chunks.
pub fn deploy_chunks(service: &str, module: &[u8], dry_run: bool) -> Vec<api::DeployChunk> {
    let header = api::DeployHeader {
        service: service.to_owned(),
        size: module.len() as u64,
        dry_run,
        fuel_per_apply: 0,
        max_memory_bytes: 0,
        ..Default::default()
    };
    deploy_chunks_with(header, module)
}

/// A deploy upload with a given header.
pub use waft_client::deploy_chunks as deploy_chunks_with;

/// The encoded descriptors of `proto/raft.proto`, for gRPC server reflection (the client
/// API's are `api::FILE_DESCRIPTOR_SET`).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("waft_descriptor");

use serde::{Serialize, de::DeserializeOwned};

/// The only payload encoding nodes speak today: postcard of openraft 0.10 types.
pub const FORMAT_POSTCARD: u32 = 1;

/// Wraps an openraft message for the wire.
pub fn encode<T: Serialize>(value: &T) -> Result<raft::RaftMessage, tonic::Status> {
    postcard::to_allocvec(value)
        .map(|payload| raft::RaftMessage {
            format: FORMAT_POSTCARD,
            payload,
        })
        .map_err(|e| tonic::Status::internal(format!("cannot encode a Raft message: {e}")))
}

/// Unwraps an openraft message from the wire. A wrong format or undecodable bytes is an
/// `INVALID_ARGUMENT` error naming the message type, never silently dropped.
pub fn decode<T: DeserializeOwned>(message: &raft::RaftMessage) -> Result<T, tonic::Status> {
    if message.format != FORMAT_POSTCARD {
        return Err(tonic::Status::invalid_argument(format!(
            "Raft message in encoding {} (this node speaks {FORMAT_POSTCARD}); are the nodes running \
             incompatible waft versions?",
            message.format
        )));
    }
    postcard::from_bytes(&message.payload).map_err(|e| {
        tonic::Status::invalid_argument(format!(
            "undecodable {} ({} bytes): {e}",
            std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("message"),
            message.payload.len()
        ))
    })
}
