//! The node-to-node calls of state audits and heals, client side: the leader collecting each
//! member's digest, and a diverged replica fetching state from a majority replica.

use super::network::NetworkFactory;
use crate::Raft;
use crate::storage::{DigestReply, HealReply, HealRequest, Healer};
use crate::types::NodeId;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How long one audit or heal RPC may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks node `node` at `addr` for its digest at audit index `index`.
pub async fn fetch_digest(
    net: &NetworkFactory,
    node: NodeId,
    addr: &str,
    index: u64,
) -> Result<DigestReply, String> {
    net.call(node, addr, &index, CALL_TIMEOUT, |mut c, r| async move {
        c.digest(r).await
    })
    .await
}

/// Heals through the Raft network; steps down first if this node leads.
///
/// It exists before the node's Raft does: a node that restarts re-applies the entries after its
/// last snapshot while openraft starts, and a heal among them must not wait for the start to
/// finish (which waits for it). Until [`PeerHealer::attach`], the node is not leader and has
/// nothing to hand over.
#[derive(Clone)]
pub struct PeerHealer {
    me: NodeId,
    raft: Arc<OnceLock<Raft>>,
    net: NetworkFactory,
}

impl std::fmt::Debug for PeerHealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerHealer").finish_non_exhaustive()
    }
}

impl PeerHealer {
    /// A healer reaching peers through `net`; see [`PeerHealer::attach`].
    pub fn new(me: NodeId, net: NetworkFactory) -> PeerHealer {
        PeerHealer {
            me,
            raft: Arc::default(),
            net,
        }
    }

    /// A healer for the node behind `raft`, reaching peers through `net`.
    pub fn with_raft(raft: Raft, net: NetworkFactory) -> PeerHealer {
        let healer = PeerHealer::new(*raft.node_id(), net);
        healer.attach(raft);
        healer
    }

    /// Gives the healer the node's Raft, once it exists (for the hand-over before a heal).
    pub fn attach(&self, raft: Raft) {
        let _ = self.raft.set(raft);
    }
}

impl Healer for PeerHealer {
    fn me(&self) -> NodeId {
        self.me
    }

    fn step_down(&self, to: Vec<NodeId>) -> BoxFuture<'static, ()> {
        let raft = self.raft.get().cloned();
        async move {
            let Some(raft) = raft else { return };
            let me = *raft.node_id();
            if raft.current_leader().await != Some(me) {
                return;
            }
            let Some(target) = to.into_iter().find(|n| *n != me) else {
                return;
            };
            tracing::warn!(
                to = target,
                "this leader's state diverged from the majority's: handing leadership to a majority replica before healing"
            );
            if let Err(e) = raft.trigger().transfer_leader(target).await {
                tracing::warn!(error = %e, "leadership transfer before the heal failed");
            }
        }
        .boxed()
    }

    fn fetch(
        &self,
        node: NodeId,
        addr: String,
        request: HealRequest,
    ) -> BoxFuture<'static, Result<HealReply, String>> {
        let net = self.net.clone();
        async move {
            net.call(node, &addr, &request, CALL_TIMEOUT, |mut c, r| async move {
                c.heal_state(r).await
            })
            .await
        }
        .boxed()
    }
}
