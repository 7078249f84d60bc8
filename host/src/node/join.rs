//! Joining a running cluster (`waft node --join SEEDS`): find a member that knows a leader,
//! add this node as a learner, then make it a voter. A node started on an empty data directory
//! that the cluster already lists is a member that lost its data: it is removed first, then
//! added back, and copies the log (or a snapshot) again.
//!
//! The protocol lives here, in the node, so that anything that starts a node can join with it;
//! how seeds are found (host names, mDNS) and connected to (TLS, tokens) is the caller's, and
//! what happened comes back typed for the caller to print.

use super::Node;
use crate::pb::api::{self, cluster_client::ClusterClient};
use std::time::Duration;
use waft_client::Conn;

/// How long a joining node keeps looking for a member that knows a leader.
const FIND_ATTEMPTS: u32 = 60;
/// How many times a membership call is made while another change is in flight.
const ADMIN_ATTEMPTS: u32 = 50;

/// How a join ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The cluster lists this node as a voter already: nothing was changed.
    AlreadyVoter,
    /// This node is a voter now.
    Voter {
        /// The leader's address when the join began.
        leader_addr: String,
        /// Set when the cluster listed this node although its data directory was new (it lost
        /// its data): it was removed and added back. `true` if it had been a voter.
        readded: Option<bool>,
    },
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// No seed led to a member that knows a leader within the time allowed.
    #[error("no seed led to a cluster with a leader; last: {0}")]
    NoLeader(String),
    /// Another node has this id.
    #[error("node id {id} is already taken by {addr} in that cluster")]
    IdTaken {
        /// The id asked for.
        id: u64,
        /// The member that has it.
        addr: String,
    },
    /// The cluster runs a cluster version this node's build does not.
    #[error("{0}")]
    Version(String),
    /// A membership call failed for good.
    #[error("{what}: {message}")]
    Membership {
        /// The step: "cannot remove node 3", "cannot add node 3 as a learner", ...
        what: String,
        /// What the leader said.
        message: String,
    },
}

/// Whether `node` has never been part of a cluster: no cluster id, nothing in its log.
pub fn is_fresh(node: &Node) -> bool {
    node.cluster_id().is_none() && node.metrics().last_log_index.is_none()
}

/// Joins node `id`, reachable at `addr`, to the cluster that `seeds` lead to. `seeds` names
/// the addresses to try (each with the TLS server name to check, if any), asked again while
/// none answers; `connect` opens a connection to one. `fresh`: the node's data directory was
/// new ([`is_fresh`]). `runs`: the cluster versions this node runs; a cluster at a version
/// outside them is refused before anything changes.
pub async fn join<S, C>(
    seeds: S,
    connect: C,
    id: u64,
    addr: &str,
    fresh: bool,
    runs: crate::version::Runs,
) -> Result<Joined, JoinError>
where
    S: AsyncFn() -> Vec<(String, Option<String>)>,
    C: AsyncFn(&str, Option<&str>) -> Result<Conn, String>,
{
    let (cluster, status) = find_member(seeds, connect).await?;
    if let Some(why) = runs.refusal(status.cluster_version.max(crate::version::FIRST)) {
        return Err(JoinError::Version(why));
    }
    if let Some(m) = status.members.iter().find(|m| m.id == id && m.addr != addr) {
        return Err(JoinError::IdTaken {
            id,
            addr: m.addr.clone(),
        });
    }
    let mut readded = None;
    match status.members.iter().find(|m| m.id == id) {
        Some(m) if fresh => {
            tracing::warn!(
                node = id,
                voter = m.voter,
                "this node is listed by the cluster but its data directory is new: it lost its \
                 data; removing it from the cluster and adding it back"
            );
            let remove = api::RemoveNodeRequest { id };
            membership(&format!("cannot remove node {id}"), || {
                let mut c = cluster.clone();
                async move {
                    match c.remove_node(remove).await {
                        // Removed already (a retry after a lost reply).
                        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
                        other => other.map(drop),
                    }
                }
            })
            .await?;
            readded = Some(m.voter);
        }
        Some(m) if m.voter => return Ok(Joined::AlreadyVoter),
        _ => {}
    }
    let learner = api::AddLearnerRequest {
        id,
        addr: addr.to_owned(),
    };
    membership(&format!("cannot add node {id} as a learner"), || {
        let mut c = cluster.clone();
        let req = learner.clone();
        async move { c.add_learner(req).await.map(drop) }
    })
    .await?;
    // Promote with "add voter" (not "replace voters"), so nodes joining at once do not undo
    // each other.
    let promote = api::ChangeMembershipRequest {
        voters: vec![],
        retain: false,
        add_voters: vec![id],
    };
    membership(&format!("cannot make node {id} a voter"), || {
        let mut c = cluster.clone();
        let req = promote.clone();
        async move { c.change_membership(req).await.map(drop) }
    })
    .await?;
    Ok(Joined::Voter {
        leader_addr: status.leader_addr,
        readded,
    })
}

/// A member of the cluster that knows a leader, through the first seed that answers with
/// one; retried for a minute while seeds are unreachable or leaderless.
async fn find_member<S, C>(
    seeds: S,
    connect: C,
) -> Result<(ClusterClient<Conn>, api::StatusReply), JoinError>
where
    S: AsyncFn() -> Vec<(String, Option<String>)>,
    C: AsyncFn(&str, Option<&str>) -> Result<Conn, String>,
{
    let mut last = String::from("no seed address given");
    for _ in 0..FIND_ATTEMPTS {
        for (addr, name) in seeds().await {
            let conn = match connect(&addr, name.as_deref()).await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("cannot reach {addr}: {e}");
                    continue;
                }
            };
            let mut cluster = ClusterClient::new(conn);
            match cluster.status(api::StatusRequest::default()).await {
                Ok(s) if s.get_ref().leader_id.is_some() => return Ok((cluster, s.into_inner())),
                Ok(_) => last = format!("{addr} knows no leader (not initialized yet?)"),
                Err(s) => last = format!("{addr}: {}", s.message()),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(JoinError::NoLeader(last))
}

/// Runs a membership call, retrying while another membership change is in flight or the
/// leader is changing.
async fn membership<F, Fut>(what: &str, mut call: F) -> Result<(), JoinError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Ok(()) => return Ok(()),
            Err(s)
                if tries < ADMIN_ATTEMPTS
                    && matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::Unavailable
                    ) =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => {
                return Err(JoinError::Membership {
                    what: what.to_owned(),
                    message: s.message().to_owned(),
                });
            }
        }
    }
}
