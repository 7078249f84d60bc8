//! Compiled code from a peer (`waft node --share-compiled`).
//!
//! Compiling a big component (CPython or a JS engine inside, 10–20 MiB) takes seconds of every
//! core, and before a deploy commits every member compiles it: on machines that run several
//! members, or under load, that is most of a deploy's time. A member that shares compiled code
//! fetches what the leader compiled (the leader compiles a new module before it asks the
//! members to hold it) into its own disk cache, where the runtime loads it like code it
//! compiled itself; wasmtime refuses code made for another engine configuration, and the
//! member then compiles.
//!
//! A member runs this code natively, so it must trust the member that made it: nodes share
//! compiled code only under mutual TLS (see `Node::start`), only with the members the leader
//! names, and only code for their own artifact key.

use super::modules::{ModulePeers, rand_suffix};
use crate::runtime::ModuleHash;
use crate::types::NodeId;
use futures::StreamExt;
use std::path::Path;
use tokio::io::AsyncWriteExt;

/// Fetches the compiled code for `hash` and engine key `key` from the first of `sources`
/// that has it, into `dest` (written under a temporary name, then renamed), before
/// `deadline`. Returns the node it came from, or every source's reason.
pub async fn fetch(
    peers: &dyn ModulePeers,
    sources: &[(NodeId, String)],
    hash: &ModuleHash,
    key: &str,
    dest: &Path,
    deadline: tokio::time::Instant,
) -> Result<NodeId, String> {
    let me = peers.me();
    let mut reasons = Vec::new();
    for (node, addr) in sources.iter().filter(|(n, _)| *n != me) {
        let attempt = fetch_from(peers, *node, addr, hash, key, dest);
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(())) => return Ok(*node),
            Ok(Err(e)) => reasons.push(format!("node {node}: {e}")),
            Err(_) => {
                reasons.push(format!("node {node}: out of time"));
                break;
            }
        }
    }
    if reasons.is_empty() {
        reasons.push("no other member is known".to_owned());
    }
    Err(reasons.join("; "))
}

async fn fetch_from(
    peers: &dyn ModulePeers,
    node: NodeId,
    addr: &str,
    hash: &ModuleHash,
    key: &str,
    dest: &Path,
) -> Result<(), String> {
    let (size, mut stream) = peers
        .open_compiled(node, addr.to_owned(), hash.to_hex(), key.to_owned())
        .await?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = Partial(dest.with_extension(format!("cwasm.{:x}.tmp", rand_suffix())));
    let cannot_write = |e: std::io::Error| format!("cannot write {}: {e}", tmp.0.display());
    let mut file = tokio::fs::File::create(&tmp.0)
        .await
        .map_err(cannot_write)?;
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        received += chunk.len() as u64;
        if received > size {
            return Err(format!("more than the {size} bytes announced"));
        }
        file.write_all(&chunk).await.map_err(cannot_write)?;
    }
    if received != size {
        return Err(format!("{received} of the {size} bytes announced"));
    }
    file.flush().await.map_err(cannot_write)?;
    drop(file);
    tokio::fs::rename(&tmp.0, dest)
        .await
        .map_err(|e| format!("cannot write {}: {e}", dest.display()))
}

/// A file being received: removed unless it was renamed, also when the fetch is abandoned
/// (its deadline) halfway.
struct Partial(std::path::PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        // After the rename there is nothing here to remove.
        let _ = std::fs::remove_file(&self.0);
    }
}
