//! Running a heal on this node (see `heal.rs` for what a heal is): wait for the node's network,
//! have a majority replica send the diverged items as of the votes entry, install them, and
//! record the outcome. Nothing else in the state machine calls into this file but the store.

use super::audit::{HealPlan, HealRecord};
use super::heal::{HEAL_DEADLINE, HEAL_RETRY, HealReply, Healer, HealerSlot};
use super::{StateMachineStore, lock_or_stop};
use crate::runtime::ModuleHash;
use crate::types::NodeId;
use std::sync::Arc;

impl StateMachineStore {
    /// Rebuilds the planned items from a majority replica; never fails the apply (a heal that
    /// cannot complete is recorded, and the items stay unavailable).
    pub(super) async fn heal(&self, plan: HealPlan) {
        let healer = self.wait_for_healer().await;
        let record = |source: Option<NodeId>, error: Option<String>| HealRecord {
            audit_index: plan.audit_index,
            at_index: plan.at_index,
            items: plan.labels(),
            source,
            error,
        };
        let outcome = match healer {
            None => Err("this node has no network to heal through".to_owned()),
            Some(healer) => self.fetch_and_install(&plan, healer).await,
        };
        let rec = match outcome {
            Ok(source) => {
                tracing::warn!(
                    items = ?plan.labels(),
                    audit_index = plan.audit_index,
                    at_index = plan.at_index,
                    source,
                    "HEALED: rebuilt the diverged state from a majority replica"
                );
                record(Some(source), None)
            }
            Err(e) => {
                tracing::error!(
                    items = ?plan.labels(),
                    audit_index = plan.audit_index,
                    error = %e,
                    "heal failed: the diverged state stays unavailable until the next audit"
                );
                record(None, Some(e))
            }
        };
        // On a blocking thread: a query may hold the lock for as long as its guest call.
        let state = self.handle.state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut st = lock_or_stop(&state);
            st.note_heal(rec);
            st.publish();
        })
        .await;
    }

    /// The healer, waiting (up to [`HEAL_DEADLINE`]) while the node is still starting.
    async fn wait_for_healer(&self) -> Option<Arc<dyn Healer>> {
        let deadline = tokio::time::Instant::now() + HEAL_DEADLINE;
        loop {
            match &*lock_or_stop(&self.handle.healer) {
                HealerSlot::Ready(h) => return Some(h.clone()),
                HealerSlot::Closed => return None,
                HealerSlot::Starting if tokio::time::Instant::now() >= deadline => return None,
                HealerSlot::Starting => {}
            }
            tokio::time::sleep(HEAL_RETRY).await;
        }
    }

    async fn fetch_and_install(
        &self,
        plan: &HealPlan,
        healer: Arc<dyn Healer>,
    ) -> Result<NodeId, String> {
        let me = healer.me();
        let mut plan = plan.clone();
        plan.sources.retain(|(n, _)| *n != me);
        let plan = &plan;
        if plan.sources.is_empty() {
            return Err("no other majority replica has an address in the membership".into());
        }
        healer
            .step_down(plan.sources.iter().map(|(n, _)| *n).collect())
            .await;
        let store = self.handle.modules.clone();
        let have: Vec<String> = tokio::task::spawn_blocking(move || {
            store.hashes().iter().map(ModuleHash::to_hex).collect()
        })
        .await
        .map_err(|e| format!("heal task failed: {e}"))?;
        let request = plan.request(have);
        let deadline = tokio::time::Instant::now() + HEAL_DEADLINE;
        let mut gone = vec![false; plan.sources.len()];
        let mut last_error = String::from("no majority replica answered");
        for attempt in 0usize.. {
            let i = attempt % plan.sources.len();
            if gone.iter().all(|g| *g) {
                return Err(format!(
                    "no majority replica still holds the state as of index {}",
                    plan.at_index
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("gave up after {HEAL_DEADLINE:?}: {last_error}"));
            }
            if gone[i] {
                continue;
            }
            let (node, addr) = plan.sources[i].clone();
            match healer.fetch(node, addr, request.clone()).await {
                Ok(HealReply::Ready(source)) => {
                    let state = self.handle.state.clone();
                    let plan = plan.clone();
                    return tokio::task::spawn_blocking(move || {
                        let mut st = lock_or_stop(&state);
                        let installed = st.install_heal(&plan, source);
                        st.publish();
                        installed
                    })
                    .await
                    .map_err(|e| format!("heal task failed: {e}"))?
                    .map(|()| node);
                }
                Ok(HealReply::Gone) => gone[i] = true,
                Ok(HealReply::NotYet { applied }) => {
                    last_error = format!("node {node} has applied up to {applied} only");
                }
                Err(e) => last_error = format!("node {node}: {e}"),
            }
            if i + 1 == plan.sources.len() {
                tokio::time::sleep(HEAL_RETRY).await;
            }
        }
        unreachable!("the loop returns")
    }
}
