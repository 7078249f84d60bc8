//! Service versions: deploys, rollbacks and the modules kept for them.

use crate::runtime::{ApplyCtx, ModuleHash};
use crate::storage::snapshot::VersionRecord;
use crate::types::{Response, ServiceLimits};
use std::sync::Arc;

use super::{MAX_VERSIONS, Service, SmState};

impl SmState {
    /// Installs `module` as `service`, carrying the old module's state over through
    /// snapshot → restore. Any failure leaves the old module serving, on every replica alike.
    pub(super) fn deploy(
        &mut self,
        service: &str,
        module: Vec<u8>,
        limits: ServiceLimits,
        ctx: ApplyCtx,
        forced: Option<String>,
    ) -> Response {
        let hash = ModuleHash::of(&module);
        let bytes = self
            .rep
            .modules
            .get(&hash)
            .cloned()
            .unwrap_or_else(|| Arc::new(module));
        self.activate(service, bytes, limits, ctx, forced)
    }

    /// Makes an earlier version serve again (as a new version, so history only grows).
    pub(super) fn rollback(&mut self, service: &str, to: Option<u32>, ctx: ApplyCtx) -> Response {
        let Some(svc) = self.rep.services.get(service) else {
            return Response::NoSuchService(service.to_owned());
        };
        let Some(target) = svc.rollback_target(to) else {
            let kept: Vec<String> = svc.history.iter().map(|r| r.version.to_string()).collect();
            return Response::DeployFailed(match to {
                Some(v) => format!(
                    "service {service:?} has no version {v} (kept: {})",
                    kept.join(", ")
                ),
                None => format!("service {service:?} has no earlier version to roll back to"),
            });
        };
        let Some(bytes) = self.rep.module_of(target) else {
            return Response::DeployFailed(format!(
                "the module of version {} is no longer kept",
                target.version
            ));
        };
        let (limits, forced) = (target.limits, target.forced.clone());
        self.activate(service, bytes, limits, ctx, forced)
    }

    /// Installs `module` as the next version of `service`, carrying the old module's state over
    /// through snapshot → restore. Any failure leaves the old version serving, on every replica
    /// alike. The new instance is opened at the deploy entry (its start-up code and `restore`
    /// see that entry's clock and randomness).
    pub(super) fn activate(
        &mut self,
        service: &str,
        module: Arc<Vec<u8>>,
        limits: ServiceLimits,
        ctx: ApplyCtx,
        forced: Option<String>,
    ) -> Response {
        let index = ctx.index;
        let loaded = match self.runtime.load(&module) {
            Ok(m) => m,
            Err(e) => return Response::DeployFailed(e.to_string()),
        };
        let limits_now = limits.apply_to(self.runtime.limits().clone());
        let mut history = Vec::new();
        let mut state = None;
        if let Some(old) = self.rep.services.get_mut(service) {
            // A replicated call on the old instance (every replica makes it here).
            match old.guest.snapshot() {
                Ok(s) => state = Some(Arc::from(s)),
                Err(e) => {
                    return Response::DeployFailed(format!(
                        "the running version could not snapshot its state: {e}"
                    ));
                }
            };
            history = old.history.clone();
        }
        let had_state = state.is_some();
        let guest = match self.runtime.open(&loaded, service, limits_now, ctx, state) {
            Ok(g) => g,
            Err(crate::runtime::OpenError::Guest(e)) if had_state => {
                return Response::DeployFailed(format!(
                    "the new version refused the current state: {e}"
                ));
            }
            Err(e) => return Response::DeployFailed(e.to_string()),
        };
        let hash = loaded.hash();
        let version = history.last().map_or(1, |r| r.version + 1);
        history.push(VersionRecord {
            version,
            module: hash.to_hex(),
            deployed_at: index,
            limits,
            forced,
        });
        if history.len() > MAX_VERSIONS {
            history.drain(..history.len() - MAX_VERSIONS);
        }
        self.rep.modules.insert(hash, module);
        self.rep.services.insert(
            service.to_owned(),
            Service {
                module: loaded,
                guest,
                deployed_at: index,
                history,
            },
        );
        self.prune_modules();
        Response::Deployed {
            module: hash.to_hex(),
            version,
        }
    }

    /// Drops module bytes no kept version uses.
    pub(super) fn prune_modules(&mut self) {
        let used: std::collections::BTreeSet<String> = self
            .rep
            .services
            .values()
            .flat_map(|s| s.history.iter().map(|r| r.module.clone()))
            .collect();
        self.rep.modules.retain(|h, _| used.contains(&h.to_hex()));
    }
}
