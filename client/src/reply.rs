//! What the cluster answers: a command's outcome and index, a query's answer, a deploy's
//! result.

use crate::Error;
use crate::proto;

/// What the guest did with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the guest's reply.
    Ok(Vec<u8>),
    /// The guest refused it; nothing changed.
    Rejected(String),
    /// The guest trapped (out of fuel or memory, a panic); waft rolled the call back.
    Trapped(String),
}

impl Outcome {
    pub(crate) fn from_submit(o: Option<proto::submit_reply::Outcome>) -> Result<Outcome, Error> {
        use proto::submit_reply::Outcome as O;
        match o {
            Some(O::Ok(b)) => Ok(Outcome::Ok(b)),
            Some(O::Rejected(m)) => Ok(Outcome::Rejected(m)),
            Some(O::Trapped(m)) => Ok(Outcome::Trapped(m)),
            None => Err(empty()),
        }
    }

    /// The reply, or the refusal or trap as an error message.
    pub fn into_result(self) -> Result<Vec<u8>, String> {
        match self {
            Outcome::Ok(b) => Ok(b),
            Outcome::Rejected(m) => Err(format!("rejected: {m}")),
            Outcome::Trapped(m) => Err(format!("trapped: {m}")),
        }
    }
}

pub(crate) fn empty() -> Error {
    Error::Server {
        code: tonic::Code::Internal,
        message: "the node sent an empty reply".to_owned(),
    }
}

/// A submitted command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Its log index.
    pub index: u64,
    /// What the guest did with it.
    pub outcome: Outcome,
}

impl Applied {
    pub(crate) fn from_reply(r: proto::SubmitReply) -> Result<Applied, Error> {
        Ok(Applied {
            index: r.index,
            outcome: Outcome::from_submit(r.outcome)?,
        })
    }
}

/// A query's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The index the answering node had applied.
    pub applied_index: u64,
    /// What the guest answered.
    pub outcome: Outcome,
}

/// How fresh a query's answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Confirmed with a quorum: sees every write acknowledged before the query.
    #[default]
    Linearizable,
    /// The leader's lease, no round trip.
    Lease,
    /// The contacted node's own state; may lag.
    Stale,
}

/// A deploy's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// The module's sha256 (hex).
    pub module_sha256: String,
    /// The log index it took effect at.
    pub index: u64,
    /// The service's version now.
    pub version: u32,
    /// The service already ran this module: nothing changed.
    pub unchanged: bool,
}
