//! Preparing a deploy, client side: before it proposes a deploy, the leader sends the module
//! to the other voters, which compile it (see `RaftService::prepare_module`), so that the
//! deploy's apply finds it compiled everywhere a quorum needs it. A follower that compiled a
//! large component only when applying its deploy stopped answering Raft for as long (its
//! apply queue backed up into openraft's core), and with two such followers the leader lost
//! its quorum: writes stalled and elections followed (issue 18).

use super::network::NetworkFactory;
use crate::pb::{self, raft::ModuleChunk, raft::raft_client::RaftClient};
use crate::types::NodeId;
use std::sync::Arc;
use std::time::Duration;

/// Sends `module` (its sha256 `sha256`) to node `node` at `addr` and waits, at most `timeout`,
/// until it has compiled it. Returns how long the compile took there, in milliseconds.
pub async fn prepare_module(
    net: &NetworkFactory,
    node: NodeId,
    addr: &str,
    module: Arc<Vec<u8>>,
    sha256: String,
    timeout: Duration,
) -> Result<u64, String> {
    use pb::raft::module_chunk::Kind;
    let client = RaftClient::new(net.channel(addr)?);
    let size = module.len() as u64;
    let header = ModuleChunk {
        kind: Some(Kind::Header(pb::raft::ModuleHeader { sha256, size })),
    };
    // Chunks are cut as the stream is read, so the module is never copied whole.
    let chunks = (0..module.len().div_ceil(CHUNK)).map(move |i| ModuleChunk {
        kind: Some(Kind::Data(
            module[i * CHUNK..((i + 1) * CHUNK).min(module.len())].to_vec(),
        )),
    });
    let mut req = tonic::Request::new(futures::stream::iter(std::iter::once(header).chain(chunks)));
    net.identity().stamp(req.metadata_mut(), node);
    req.set_timeout(timeout);
    let mut client = client;
    let reply = client
        .prepare_module(req)
        .await
        .map_err(|s| format!("node {node} at {addr}: {}: {}", s.code(), s.message()))?;
    let prepared: Result<u64, String> =
        pb::decode(reply.get_ref()).map_err(|s| s.message().to_owned())?;
    prepared.map_err(|e| format!("node {node} at {addr} cannot run the module: {e}"))
}

/// The size of one chunk of a module on the wire.
const CHUNK: usize = 1 << 20;
