//! A guest's state as the history of its instance ([`ReplayForm`]): what snapshots, backups,
//! heals and trap recovery carry, and the context every replicated call runs with.

use super::bindings::v1::waft::fsm::types::ApplyContext;

/// Deterministic facts about a log entry, passed to the guest with its command.
pub type ApplyCtx = ApplyContext;

/// Where an instance's history starts: the context of its opening call, and the state it
/// was opened with (`None`: a fresh module, opened by a warm-up `snapshot` call instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplayPoint {
    /// Log index.
    pub index: u64,
    /// Term of the leader that proposed it.
    pub term: u64,
    /// The entry's timestamp.
    pub timestamp_ms: u64,
}

impl From<ApplyContext> for ReplayPoint {
    fn from(c: ApplyContext) -> Self {
        ReplayPoint {
            index: c.index,
            term: c.term,
            timestamp_ms: c.timestamp_ms,
        }
    }
}

impl From<ReplayPoint> for ApplyContext {
    fn from(p: ReplayPoint) -> Self {
        ApplyContext {
            index: p.index,
            term: p.term,
            timestamp_ms: p.timestamp_ms,
        }
    }
}

/// A guest's state as the history of its instance: open a fresh instance at `opened_at`
/// (restoring `base`, or with the warm-up call when there is none), then make the calls of
/// `journal` in order. This is what snapshots, backups and trap recovery carry: replaying it
/// rebuilds not only the state the guest serializes but every byte of its instance, including
/// state hidden in a language runtime (a generator seeded once, a hash map's keys), because
/// the instance goes through exactly the calls the live one went through.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayForm {
    /// The context of the opening call.
    pub opened_at: ReplayPoint,
    /// The snapshot the instance was opened with, if any.
    #[serde(with = "serde_bytes")]
    pub base: Option<Vec<u8>>,
    /// The calls made on the instance since, in order.
    pub journal: Vec<ReplayEntry>,
}

/// One call of a [`ReplayForm`]'s journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayEntry {
    /// The context the call ran with.
    pub at: ReplayPoint,
    /// What was called.
    pub call: ReplayCall,
}

/// A replicated call on a guest instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReplayCall {
    /// `apply` with these command bytes (applied or rejected; trapped calls are not kept).
    Apply(serde_bytes::ByteBuf),
    /// `snapshot` (an audit, a deploy reading the state): its bytes are not kept, only the fact
    /// that the instance was asked.
    Snapshot,
    /// `fire` of the timer `key` with `payload` (0.2.0 guests; delivered or refused by the
    /// guest: trapped calls are not kept).
    Fire {
        key: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
}
