//! Node-to-node messages recorded for compatibility fixtures. With `waft node
//! --record-messages DIR` (hidden; only `scripts/make-fixtures` uses it) a node writes the first messages of
//! each kind it receives and answers into DIR, as their wire bytes: `KIND-N.bin`, a
//! `RaftMessage` or, for `hold-module`, a `HoldModuleRequest`. Every later build decodes them
//! with [`decode`] (`tests/all/compat.rs`): a release that changes a message's encoding
//! without a gate breaks that test.

use crate::pb;
use crate::storage::{DigestReply, HealReply, HealRequest};
use crate::types::TypeConfig;
use openraft::raft::{
    AppendEntriesRequest, StreamAppendResult, TransferLeaderRequest, VoteRequest, VoteResponse,
};
use pb::Message as _;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// Messages kept per kind: appends carry the log's entries, so many of them.
fn keep(kind: &str) -> usize {
    if kind == "append-request" { 200 } else { 4 }
}

/// Where a node records the messages it receives and answers (see the module's doc).
#[derive(Debug, Default)]
pub struct Recorder {
    /// None: nothing is recorded.
    dir: Option<PathBuf>,
    counts: Mutex<HashMap<String, usize>>,
}

impl Recorder {
    /// Records into `dir` (created if missing), or nothing.
    pub fn new(dir: Option<PathBuf>) -> Recorder {
        Recorder {
            dir,
            counts: Mutex::default(),
        }
    }

    /// Records `message` as one of `kind`, unless it records nothing or has kept enough of
    /// them.
    pub fn record(&self, kind: &str, message: &impl pb::Message) {
        let Some(dir) = &self.dir else { return };
        let n = {
            let mut counts = crate::sync::lock_anyway(&self.counts);
            let n = counts.entry(kind.to_owned()).or_default();
            if *n >= keep(kind) {
                return;
            }
            *n += 1;
            *n
        };
        let path = dir.join(format!("{kind}-{n}.bin"));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, message.encode_to_vec()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot record a message");
        }
    }
}

/// Decodes a recorded message of `kind` as this build reads that message, and shows it.
pub fn decode(kind: &str, bytes: &[u8]) -> Result<String, String> {
    fn body<T: serde::de::DeserializeOwned + std::fmt::Debug>(
        bytes: &[u8],
    ) -> Result<String, String> {
        let message = pb::raft::RaftMessage::decode(bytes).map_err(|e| e.to_string())?;
        pb::decode::<T>(&message)
            .map(|v| format!("{v:?}"))
            .map_err(|s| s.message().to_owned())
    }
    match kind {
        "vote-request" | "pre-vote-request" => body::<VoteRequest<TypeConfig>>(bytes),
        "vote-reply" | "pre-vote-reply" => body::<VoteResponse<TypeConfig>>(bytes),
        "append-request" => body::<AppendEntriesRequest<TypeConfig>>(bytes),
        "append-reply" => body::<StreamAppendResult<TypeConfig>>(bytes),
        "transfer-leader-request" => body::<TransferLeaderRequest<TypeConfig>>(bytes),
        "digest-request" => body::<u64>(bytes),
        "digest-reply" => body::<DigestReply>(bytes),
        "heal-request" => body::<HealRequest>(bytes),
        "heal-reply" => body::<HealReply>(bytes),
        "hold-module-request" => pb::raft::HoldModuleRequest::decode(bytes)
            .map(|m| format!("{m:?}"))
            .map_err(|e| e.to_string()),
        "hold-module-reply" => body::<Result<u64, String>>(bytes),
        other => Err(format!("no message kind {other:?} in this build")),
    }
}
