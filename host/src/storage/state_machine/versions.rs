//! Service versions: deploys, rollbacks and the modules kept for them in the module store.

use crate::runtime::{ApplyCtx, ModuleHash};
use crate::storage::modules::UNUSED_GRACE;
use crate::storage::snapshot::VersionRecord;
use crate::types::{Response, ServiceLimits};
use std::io;

use super::{Env, MAX_VERSIONS, Replicated, Service};

impl Replicated {
    /// Installs the stored module `hash` as `service`. The apply fetched it before taking the
    /// lock (see `StateMachineStore::fetch_modules`); missing now is an error that stops the
    /// node, not a refusal other replicas would not make.
    pub(super) fn deploy_stored(
        &mut self,
        env: &mut Env<'_>,
        service: &str,
        hash: &str,
        limits: ServiceLimits,
        ctx: ApplyCtx,
        forced: Option<String>,
    ) -> io::Result<Response> {
        let Some(h) = ModuleHash::from_hex(hash) else {
            // Malformed on every replica alike.
            return Ok(Response::DeployFailed(format!(
                "{hash:?} is not a module hash"
            )));
        };
        let module = env.modules.read(&h)?;
        Ok(self.activate(env, service, &module, limits, ctx, forced))
    }
    /// Makes an earlier version serve again (as a new version, so history only grows).
    pub(super) fn rollback(
        &mut self,
        env: &mut Env<'_>,
        service: &str,
        to: Option<u32>,
        ctx: ApplyCtx,
    ) -> io::Result<Response> {
        let Some(svc) = self.services.get(service) else {
            return Ok(Response::NoSuchService(service.to_owned()));
        };
        let Some(target) = svc.rollback_target(to) else {
            let kept: Vec<String> = svc.history.iter().map(|r| r.version.to_string()).collect();
            return Ok(Response::DeployFailed(match to {
                Some(v) => format!(
                    "service {service:?} has no version {v} (kept: {})",
                    kept.join(", ")
                ),
                None => format!("service {service:?} has no earlier version to roll back to"),
            }));
        };
        let target = target.clone();
        let bytes = self.module_of(env, &target)?;
        Ok(self.activate(env, service, &bytes, target.limits, ctx, target.forced))
    }
    /// Installs `module` as the next version of `service`, carrying the old module's state over
    /// through snapshot → restore. Any failure leaves the old version serving, on every replica
    /// alike. The new instance is opened at the deploy entry (its start-up code and `restore`
    /// see that entry's clock and randomness).
    pub(super) fn activate(
        &mut self,
        env: &mut Env<'_>,
        service: &str,
        module: &[u8],
        limits: ServiceLimits,
        ctx: ApplyCtx,
        forced: Option<String>,
    ) -> Response {
        let index = ctx.index;
        let loaded = match env.runtime.load_committed(module) {
            Ok(m) => m,
            Err(e) => return Response::DeployFailed(e.to_string()),
        };
        let limits_now = limits.apply_to(env.runtime.limits().clone());
        let mut history = Vec::new();
        let mut timers = super::Timers::default();
        let mut state = None;
        if let Some(old) = self.services.get_mut(service) {
            // A replicated call on the old instance (every replica makes it here).
            match old.guest.snapshot() {
                Ok(s) => state = Some(std::sync::Arc::from(s)),
                Err(e) => {
                    return Response::DeployFailed(format!(
                        "the running version could not snapshot its state: {e}"
                    ));
                }
            };
            history = old.history.clone();
            timers = old.timers.clone();
        }
        let had_state = state.is_some();
        let guest = match env.runtime.open(&loaded, service, limits_now, ctx, state) {
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
        self.services.insert(
            service.to_owned(),
            Service {
                module: loaded,
                guest,
                deployed_at: index,
                history,
                timers,
            },
        );
        self.prune_modules(env);
        Response::Deployed {
            module: hash.to_hex(),
            version,
        }
    }
    /// Removes from the store the modules no kept version uses (after [`UNUSED_GRACE`]: a
    /// module fetched for a deploy not applied yet is in no version). Local: the store is not
    /// replicated state, and a node missing a module fetches it again.
    pub(super) fn prune_modules(&mut self, env: &mut Env<'_>) {
        let used = self.used_modules();
        env.modules.retain(&used, UNUSED_GRACE);
    }
}
