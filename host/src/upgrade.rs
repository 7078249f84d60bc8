//! The leader's side of cluster versions (`crate::version`): it asks every member which
//! versions its build runs and raises the active version, by a [`Request::ClusterVersion`]
//! entry, once all of them run a newer one: by itself (a task on every node that acts while
//! its node leads), or when an operator finalizes (`waft cluster finalize-upgrade`).
//!
//! Every member counts, learners too: a learner reads the log like a voter, and a member whose
//! build cannot run the new version would stop at the entry. A member that does not answer
//! holds the version where it is (it may be an old build restarting).

use crate::Raft;
use crate::pb::api;
use crate::raft::network::NetworkFactory;
use crate::storage::StateHandle;
use crate::types::{NodeId, Request};
use crate::version::{Gate, Runs};
use std::time::Duration;

/// How long a member has to say what it runs.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a leader looks whether every member runs a newer version.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// What one member said of its build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberBuild {
    /// Its id.
    pub id: NodeId,
    /// Its address.
    pub addr: String,
    /// `VERSION (commit COMMIT)`; `None` when it did not answer.
    pub build: Option<String>,
    /// The cluster versions it runs; `None` when it did not answer.
    pub runs: Option<Runs>,
    /// Its engine fingerprint (`crate::runtime::Runtime::fingerprint`); `None` when it did not
    /// answer.
    pub engine: Option<String>,
}

/// Asks every member in `members` (id, address) for its build, all at once, each for at most
/// [`ASK_TIMEOUT`]. This node answers for itself without a call.
pub async fn ask_members(
    net: &NetworkFactory,
    state: &StateHandle,
    me: NodeId,
    members: Vec<(NodeId, String)>,
) -> Vec<MemberBuild> {
    let asks = members.into_iter().map(|(id, addr)| {
        let net = net.clone();
        let state = state.clone();
        async move {
            if id == me {
                return MemberBuild {
                    id,
                    addr,
                    build: Some(build_name(crate::version::RELEASE, crate::version::COMMIT)),
                    runs: Some(state.runs()),
                    engine: Some(state.fingerprint().to_owned()),
                };
            }
            let reply = crate::raft::peer_status::member_status(&net, id, &addr, ASK_TIMEOUT).await;
            MemberBuild {
                id,
                addr,
                build: reply.as_ref().map(|r| build_name(&r.version, &r.commit)),
                runs: reply.as_ref().map(runs_of),
                engine: reply.map(|r| r.engine),
            }
        }
    });
    futures::future::join_all(asks).await
}

/// `VERSION (commit COMMIT)`, as a build names itself; a build before releases names nothing.
pub fn build_name(version: &str, commit: &str) -> String {
    if version.is_empty() {
        "an earlier build (no version reported)".to_owned()
    } else {
        format!("{version} (commit {commit})")
    }
}

/// The versions a member's Status says it runs; a build before cluster versions (no range)
/// runs the first.
pub fn runs_of(reply: &api::StatusReply) -> Runs {
    if reply.runs_newest == 0 {
        Runs {
            oldest: crate::version::FIRST,
            newest: crate::version::FIRST,
        }
    } else {
        Runs {
            oldest: reply.runs_oldest,
            newest: reply.runs_newest,
        }
    }
}

/// Every member of `raft`'s current membership, voters and learners, with its address.
fn members(raft: &Raft) -> Vec<(NodeId, String)> {
    use openraft::async_runtime::WatchReceiver;
    raft.metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect()
}

/// How a finalize ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    /// The active version before.
    pub previous: u32,
    /// The active version now.
    pub now: u32,
    /// The entry that raised it (`None`: nothing to raise).
    pub index: Option<u64>,
    /// When nothing was raised: the members whose builds run no newer version.
    pub newest_already: Vec<NodeId>,
}

/// Why a finalize was refused.
#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    /// Members did not say what they run.
    #[error(
        "cannot finalize the upgrade: {0}. Every member must answer (a member that cannot read \
         the new version would stop at it): bring it back, or remove it from the cluster"
    )]
    Silent(String),
    /// The entry could not be written (not the leader, leadership moved).
    #[error("cannot raise the cluster version: {0}")]
    Raft(String),
}

/// Raises the active version to the newest every member runs, if that is above it. Run on
/// the leader.
pub async fn finalize(
    raft: &Raft,
    net: &NetworkFactory,
    state: &StateHandle,
) -> Result<Finalized, FinalizeError> {
    let builds = ask_members(net, state, *raft.node_id(), members(raft)).await;
    let said: Vec<(u64, Option<Runs>)> = builds.iter().map(|b| (b.id, b.runs)).collect();
    let common = crate::version::highest_common(&said).map_err(|silent| {
        let named: Vec<String> = builds
            .iter()
            .filter(|b| silent.contains(&b.id))
            .map(|b| format!("node {} ({}) did not answer", b.id, b.addr))
            .collect();
        FinalizeError::Silent(named.join(", "))
    })?;
    let previous = state.cluster_version();
    if common <= previous {
        return Ok(Finalized {
            previous,
            now: previous,
            index: None,
            newest_already: builds
                .iter()
                .filter(|b| b.runs.is_some_and(|r| r.newest <= previous))
                .map(|b| b.id)
                .collect(),
        });
    }
    let written = raft
        .client_write(Request::ClusterVersion { version: common })
        .await
        .map_err(|e| FinalizeError::Raft(e.to_string()))?;
    tracing::info!(
        from = previous,
        to = common,
        index = written.log_id.index,
        "cluster version raised"
    );
    Ok(Finalized {
        previous,
        now: common,
        index: Some(written.log_id.index),
        newest_already: Vec::new(),
    })
}

/// Whether the cluster may now write what `gate` guards; otherwise the refusal, naming the
/// members whose builds keep it closed (asked only then).
pub async fn require(
    gate: Gate,
    raft: &Raft,
    net: &NetworkFactory,
    state: &StateHandle,
) -> Result<(), String> {
    let active = state.cluster_version();
    if active >= gate.since {
        return Ok(());
    }
    let builds = ask_members(net, state, *raft.node_id(), members(raft)).await;
    let said: Vec<(u64, Option<Runs>)> = builds.iter().map(|b| (b.id, b.runs)).collect();
    crate::version::check_gate(gate, active, &said)
}

/// Refuses a deploy while a member runs another engine than this node (the leader): the
/// deploy entry would stop it (a node applies only deploys its own engine validated, see
/// `storage::state_machine`). Members that do not answer are not waited for.
pub async fn same_engine(
    raft: &Raft,
    net: &NetworkFactory,
    state: &StateHandle,
) -> Result<(), String> {
    let mine = state.fingerprint();
    let builds = ask_members(net, state, *raft.node_id(), members(raft)).await;
    let other: Vec<String> = builds
        .iter()
        .filter_map(|b| {
            let theirs = b.engine.as_deref()?;
            (theirs != mine).then(|| {
                format!(
                    "node {} ({}, {}) runs engine {theirs}",
                    b.id,
                    b.addr,
                    b.build.as_deref().unwrap_or("?")
                )
            })
        })
        .collect();
    if other.is_empty() {
        return Ok(());
    }
    Err(format!(
        "not deployed: the members do not run one engine ({}; this leader runs {mine}), and a \
         deploy entry stops every node whose engine did not validate it. Finish the upgrade \
         (every node on the same release and limits), then deploy (docs/operations.md, \
         \"A new engine\")",
        other.join("; ")
    ))
}

/// Spawns the task that raises the version by itself while this node leads: each
/// [`LOOK_EVERY`], if this node runs a version above the active one, it asks the members and
/// raises the version when all run a newer one. Quiet: a member that does not answer only
/// waits for the next look.
pub fn spawn(raft: Raft, net: NetworkFactory, state: StateHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LOOK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let leads = {
                use openraft::async_runtime::WatchReceiver;
                raft.metrics().borrow_watched().state.is_leader()
            };
            if !leads || state.runs().newest <= state.cluster_version() {
                continue;
            }
            if let Err(e) = finalize(&raft, &net, &state).await {
                tracing::debug!(error = %e, "the cluster version stays");
            }
        }
    })
}
