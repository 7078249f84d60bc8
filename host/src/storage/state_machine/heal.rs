//! Healing a diverged replica: rebuild what it got wrong from a replica in the majority.
//!
//! An `AuditVotes` entry at index R tells every replica which items (services, the session
//! table) a majority of voters agree on. A replica whose item differs stops serving reads of
//! it and, before applying the entry after R, fetches the item as of R from a majority
//! replica: every replica that agrees and saw dissent kept the item's instance history
//! ([`Kept`]) when it applied R. The fetched history is replayed into a fresh instance, exactly
//! as a snapshot install does, so the healed replica continues from the majority's bytes at
//! the same index. A leader in the minority first hands leadership to a majority replica.
//!
//! Nothing here is replicated: a heal changes only the replica that was wrong. If no majority
//! replica can give the item within [`HEAL_DEADLINE`], the heal fails, the item stays
//! unavailable (for services), and the next audit tries again.

use super::audit::{HealPlan, Item};
use super::{Service, SmState};
use crate::runtime::{ModuleHash, ReplayForm};
use crate::storage::snapshot::{Session, VersionRecord};
use crate::types::NodeId;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// How long a diverged replica tries to fetch the majority's state before giving up (and
/// leaving the item unavailable until the next audit).
pub const HEAL_DEADLINE: Duration = Duration::from_secs(20);
/// Pause between attempts while the majority replicas have not reached the votes entry.
pub(super) const HEAL_RETRY: Duration = Duration::from_millis(100);
/// Audits whose heal sources a replica keeps.
const KEPT_SOURCES: usize = 2;

impl HealPlan {
    pub(super) fn request(&self, have_modules: Vec<String>) -> HealRequest {
        HealRequest {
            index: self.at_index,
            services: self
                .items
                .iter()
                .filter_map(|i| match i {
                    Item::Service(n) => Some(n.clone()),
                    Item::Sessions => None,
                })
                .collect(),
            sessions: self.items.contains(&Item::Sessions),
            have_modules,
        }
    }

    pub(super) fn labels(&self) -> Vec<String> {
        self.items.iter().map(Item::label).collect()
    }
}

/// A diverged replica's request to a majority replica (node-to-node `HealState` RPC).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealRequest {
    /// The votes entry's index.
    pub index: u64,
    /// Services to send.
    pub services: Vec<String>,
    /// Whether to send the session table.
    pub sessions: bool,
    /// Module hashes the asker holds already (not sent again).
    pub have_modules: Vec<String>,
}

/// The answer to a [`HealRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HealReply {
    /// This replica has not applied the votes entry yet (it has applied up to `applied`).
    NotYet {
        /// Its last applied index.
        applied: u64,
    },
    /// This replica does not hold that audit's state (it disagreed itself, saw no dissent, or
    /// has moved on past the audits it keeps).
    Gone,
    /// The items as of the votes entry.
    Ready(HealSource),
}

/// Items as of a votes entry, from a majority replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealSource {
    /// Each requested service; `None`: the majority has no such service.
    pub services: Vec<(String, Option<HealService>)>,
    /// The session table, when requested.
    pub sessions: Option<Vec<(u64, Session)>>,
    /// Module bytes the asker lacks, by hash.
    pub modules: Vec<(String, serde_bytes::ByteBuf)>,
}

/// One service as a majority replica holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealService {
    /// sha256 (hex) of the active module.
    pub module: String,
    /// Log index of the deploy that made it active.
    pub deployed_at: u64,
    /// Versions kept, oldest first.
    pub history: Vec<VersionRecord>,
    /// The guest's instance history.
    pub form: ReplayForm,
    /// Pending timers, by key.
    pub timers: Vec<(String, super::Timer)>,
}

/// What a replica that agreed with the majority kept for dissenting members.
#[derive(Debug)]
pub(super) struct Kept {
    index: u64,
    services: BTreeMap<String, Option<HealService>>,
    sessions: Option<Vec<(u64, Session)>>,
    /// The kept services' modules, by hash (their bytes are in the module store).
    modules: std::collections::BTreeSet<String>,
}

#[derive(Debug, Default)]
pub(super) struct HealSources(VecDeque<Kept>);

/// The node's way to its peers, as the state machine sees it.
#[derive(Default)]
pub(super) enum HealerSlot {
    /// The node is starting (entries after the last snapshot are re-applied before its network
    /// is up): a heal waits for it.
    #[default]
    Starting,
    Ready(Arc<dyn Healer>),
    /// The node is stopping, or healing was turned off.
    Closed,
}

/// How a diverged replica reaches its peers; the node provides it (the Raft network).
pub trait Healer: Send + Sync {
    /// This node's id: never a source for its own heal (its vote may be from before it was
    /// damaged and restarted, and agree with the majority).
    fn me(&self) -> NodeId;
    /// Called before a heal: if this node leads, hand leadership to one of `to`.
    fn step_down(&self, to: Vec<NodeId>) -> BoxFuture<'static, ()>;
    /// Asks node `node` at `addr` for the state in `request`.
    fn fetch(
        &self,
        node: NodeId,
        addr: String,
        request: HealRequest,
    ) -> BoxFuture<'static, Result<HealReply, String>>;
}

impl SmState {
    /// Keeps, as of entry `at_index`, what a dissenting member needs to rebuild `items`.
    pub(super) fn keep_heal_source(&mut self, at_index: u64, items: &[Item]) {
        let mut kept = Kept {
            index: at_index,
            services: BTreeMap::new(),
            sessions: None,
            modules: Default::default(),
        };
        for item in items {
            match item {
                Item::Sessions => {
                    kept.sessions = Some(
                        self.rep
                            .sessions
                            .iter()
                            .map(|(k, v)| (*k, v.clone()))
                            .collect(),
                    );
                }
                Item::Service(name) => {
                    let svc = self.rep.services.get(name).map(|svc| {
                        kept.modules
                            .extend(svc.history.iter().map(|r| r.module.clone()));
                        HealService {
                            module: svc.module.hash().to_hex(),
                            deployed_at: svc.deployed_at,
                            history: svc.history.clone(),
                            form: svc.guest.replay_form(),
                            timers: svc.timers.records(),
                        }
                    });
                    kept.services.insert(name.clone(), svc);
                }
            }
        }
        let sources = &mut self.local.heal_sources.0;
        if sources.len() == KEPT_SOURCES {
            sources.pop_front();
        }
        sources.push_back(kept);
    }

    /// Answers a diverged replica's request.
    pub(super) fn answer_heal(&self, request: &HealRequest) -> HealReply {
        let applied = self.rep.last_applied.map_or(0, |l| l.index);
        if applied < request.index {
            return HealReply::NotYet { applied };
        }
        let Some(kept) = self
            .local
            .heal_sources
            .0
            .iter()
            .find(|k| k.index == request.index)
        else {
            return HealReply::Gone;
        };
        let mut services = Vec::new();
        for name in &request.services {
            let Some(svc) = kept.services.get(name) else {
                return HealReply::Gone;
            };
            services.push((name.clone(), svc.clone()));
        }
        let sessions = if request.sessions {
            match &kept.sessions {
                Some(s) => Some(s.clone()),
                None => return HealReply::Gone,
            }
        } else {
            None
        };
        let modules = services
            .iter()
            .filter_map(|(_, s)| s.as_ref())
            .flat_map(|s| s.history.iter().map(|r| &r.module))
            .filter(|m| !request.have_modules.contains(m) && kept.modules.contains(*m))
            .filter_map(|m| {
                let bytes = self.modules.read(&ModuleHash::from_hex(m)?).ok()?;
                Some((m.clone(), serde_bytes::ByteBuf::from(bytes)))
            })
            .collect();
        HealReply::Ready(HealSource {
            services,
            sessions,
            modules,
        })
    }

    /// Replaces the planned items with the majority's, as of the votes entry (which is this
    /// replica's last applied entry while it heals).
    pub(super) fn install_heal(
        &mut self,
        plan: &HealPlan,
        source: HealSource,
    ) -> Result<(), String> {
        let mut new_modules: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (hash, bytes) in source.modules {
            new_modules.insert(hash, bytes.into_vec());
        }
        // Build everything first, so a failure changes nothing.
        let mut rebuilt: Vec<(String, Option<Service>)> = Vec::new();
        for (name, svc) in source.services {
            let Some(svc) = svc else {
                rebuilt.push((name, None));
                continue;
            };
            let bytes = match new_modules.get(&svc.module) {
                Some(b) => b.clone(),
                None => ModuleHash::from_hex(&svc.module)
                    .and_then(|h| self.modules.read(&h).ok())
                    .ok_or_else(|| format!("the source did not send module {}", svc.module))?,
            };
            let module = self
                .runtime
                .load_committed(&bytes)
                .map_err(|e| format!("module {} does not load: {e}", svc.module))?;
            if module.hash().to_hex() != svc.module {
                return Err(format!("module {} arrived with another hash", svc.module));
            }
            let limits = svc
                .history
                .last()
                .map(|v| v.limits)
                .unwrap_or_default()
                .apply_to(self.runtime.limits().clone());
            let guest = self
                .runtime
                .from_replay(&module, &name, limits, &svc.form)
                .map_err(|e| format!("service {name} refused the majority's state: {e}"))?;
            rebuilt.push((
                name,
                Some(Service {
                    module,
                    guest,
                    deployed_at: svc.deployed_at,
                    history: svc.history,
                    timers: super::Timers::from_records(svc.timers),
                }),
            ));
        }
        for bytes in new_modules.values() {
            self.modules
                .insert(bytes)
                .map_err(|e| format!("cannot keep a module: {e}"))?;
        }
        for (name, svc) in rebuilt {
            match svc {
                Some(s) => {
                    self.rep.services.insert(name.clone(), s);
                }
                None => {
                    self.rep.services.remove(&name);
                }
            }
            self.local.audit.status.unavailable.remove(&name);
        }
        if let Some(sessions) = source.sessions {
            self.rep.sessions = sessions.into_iter().collect();
        }
        let (rep, mut env) = self.split();
        rep.prune_modules(&mut env);
        // The healed items' state jumped: watchers read it afresh.
        self.local.events.reset(plan.at_index);
        Ok(())
    }
}
