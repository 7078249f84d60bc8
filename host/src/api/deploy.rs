//! Deploys and rollbacks: the upload, the checks on the leader before anything is proposed
//! (the module compiles, implements the world, accepts the current state; optionally the trial
//! against the running version and the determinism verifier), one deploy at a time per
//! service, and the proposal.

use super::router::{Caller, Router};
use super::steps::{DeployProgressStream, Steps, watched};
use super::{ApiLimits, convert};
use crate::pb::api;
use crate::pb::upload::Upload;
use crate::runtime::Runtime;
use crate::storage::StateHandle;
use crate::types::{Request, Response, ServiceLimits, now_ms};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tonic::{Response as GrpcResponse, Status, Streaming};

/// How long the leader waits for the members to fetch and compile a module.
const PREPARE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Where a deploy's module is, for the entry that proposes it.
enum Held {
    /// A majority of the voters holds it in their module stores: the entry names its hash.
    Stored,
    /// The entry carries the bytes (a dry run, or a member of an earlier release).
    Inline,
}

/// One lock per service being deployed on this node (see `Deploys::deploying`).
type DeployLocks = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Deploys and rollbacks on one node.
#[derive(Clone)]
pub(super) struct Deploys {
    router: Router,
    state: StateHandle,
    runtime: Runtime,
    limits: ApiLimits,
    /// One deploy at a time per service on this node, from the look at what the service runs
    /// to the new version's apply: an identical deploy that arrives meanwhile (a retry) then
    /// finds it running and changes nothing.
    deploying: DeployLocks,
}

impl std::fmt::Debug for Deploys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deploys").finish_non_exhaustive()
    }
}

impl Deploys {
    pub(super) fn new(
        router: Router,
        state: StateHandle,
        runtime: Runtime,
        limits: ApiLimits,
    ) -> Deploys {
        Deploys {
            router,
            state,
            runtime,
            limits,
            deploying: Arc::default(),
        }
    }

    /// `Waft.Deploy`.
    pub(super) async fn deploy(
        &self,
        caller: &Caller,
        mut input: Streaming<api::DeployChunk>,
    ) -> Result<GrpcResponse<api::DeployReply>, Status> {
        let (header, module) = self.upload(&mut input).await?;
        if let Some(leader) = self.router.leader(caller).await? {
            let chunks = crate::pb::deploy_chunks_with(header, &module);
            return leader
                .relay(futures::stream::iter(chunks), |mut c, r| async move {
                    c.waft.deploy(r).await
                })
                .await;
        }
        self.deploy_here(header, module, &Steps::default())
            .await
            .map(GrpcResponse::new)
    }

    /// `Waft.DeployWatched`: [`Deploys::deploy`], with each step sent as it happens and the
    /// reply (or the error) last (see [`watched`]).
    pub(super) async fn deploy_watched(
        &self,
        caller: &Caller,
        mut input: Streaming<api::DeployChunk>,
    ) -> Result<GrpcResponse<DeployProgressStream>, Status> {
        let (header, module) = self.upload(&mut input).await?;
        if let Some(leader) = self.router.leader(caller).await? {
            let chunks = crate::pb::deploy_chunks_with(header, &module);
            let relayed = leader
                .relay(futures::stream::iter(chunks), |mut c, r| async move {
                    c.waft.deploy_watched(r).await
                })
                .await?;
            let stream: DeployProgressStream = Box::pin(relayed.into_inner());
            return Ok(GrpcResponse::new(stream));
        }
        let this = self.clone();
        Ok(GrpcResponse::new(watched(|steps| async move {
            steps.tell(api::deploy_step::Kind::Received, |s| {
                s.node = this.router.id();
            });
            this.deploy_here(header, module, &steps).await
        })))
    }

    /// `Waft.RollbackWatched`: [`Deploys::rollback`], with each member's compile of the
    /// version's module sent as it happens and the reply (or the error) last.
    pub(super) async fn rollback_watched(
        &self,
        caller: &Caller,
        req: api::RollbackRequest,
    ) -> Result<GrpcResponse<DeployProgressStream>, Status> {
        if let Some(leader) = self.router.leader(caller).await? {
            let relayed = leader
                .relay(
                    req,
                    |mut c, r| async move { c.waft.rollback_watched(r).await },
                )
                .await?;
            let stream: DeployProgressStream = Box::pin(relayed.into_inner());
            return Ok(GrpcResponse::new(stream));
        }
        let this = self.clone();
        Ok(GrpcResponse::new(watched(|steps| async move {
            this.rollback_here(req, &steps).await
        })))
    }

    /// Reads a deploy's upload: the header, checked, then the module.
    async fn upload(
        &self,
        input: &mut Streaming<api::DeployChunk>,
    ) -> Result<(api::DeployHeader, Vec<u8>), Status> {
        let upload = Upload {
            call: "deploy",
            item: "module",
            max: self.runtime.limits().max_module_bytes as u64,
            chunk_timeout: None,
        };
        upload
            .read(input, |h: &api::DeployHeader| {
                if h.service.is_empty() {
                    return Err(Status::invalid_argument("a service name is required"));
                }
                if h.size == 0 {
                    return Err(Status::invalid_argument("the module is empty (0 bytes)"));
                }
                Ok(())
            })
            .await
    }

    /// A deploy on this node, the leader, with the module uploaded: the checks, the members'
    /// compiles, the proposal; each step told to `steps`.
    async fn deploy_here(
        &self,
        header: api::DeployHeader,
        module: Vec<u8>,
        steps: &Steps,
    ) -> Result<api::DeployReply, Status> {
        let limits = ServiceLimits {
            fuel_per_apply: (header.fuel_per_apply != 0).then_some(header.fuel_per_apply),
            max_memory_bytes: (header.max_memory_bytes != 0).then_some(header.max_memory_bytes),
        };
        let _turn = if header.dry_run {
            None
        } else {
            Some(self.deploy_turn(&header.service).await)
        };
        // Deploying what the service already runs, as it runs it, changes nothing: no entry,
        // no new version (a deploy retried after its connection dropped, though the first
        // attempt went through, must not add one).
        if !header.dry_run
            && let Some(unchanged) = self.already_running(&header.service, &module, limits)
        {
            return Ok(unchanged);
        }
        if !header.dry_run {
            crate::upgrade::same_engine(self.router.raft(), self.router.peers(), &self.state)
                .await
                .map_err(Status::failed_precondition)?;
        }
        let size = module.len() as u64;
        let shared = Arc::new(module);
        let validated = async {
            let started = std::time::Instant::now();
            let checked = self
                .validate(&header.service, shared.clone(), limits, "the new module")
                .await;
            if checked.is_ok() {
                steps.tell(api::deploy_step::Kind::Checked, |s| {
                    s.node = self.router.id();
                    s.millis = started.elapsed().as_millis() as u64;
                });
            }
            checked
        };
        // The members fetch the module from this node's store and compile it while this node
        // validates it (a module that fails validation is only left in their stores until
        // they drop unused modules); with shared compiled code, after.
        let ((hash, code_bytes), held) = if header.dry_run {
            (validated.await?, Held::Inline)
        } else if self.router.peers().config().share_compiled {
            // The members fetch the code this node compiles: it compiles first (alone on the
            // machine's cores when members share machines), they fetch instead of compiling.
            let sha = self.keep_module(shared.clone()).await?;
            let validated = validated.await?;
            let reserve = self.reserve(&header.service, limits);
            (
                validated,
                self.hold_members(&sha, size, &reserve, steps).await?,
            )
        } else {
            let sha = self.keep_module(shared.clone()).await?;
            let reserve = self.reserve(&header.service, limits);
            let (validated, held) =
                tokio::join!(validated, self.hold_members(&sha, size, &reserve, steps));
            (validated?, held?)
        };
        self.check_budget(&header.service, limits, &hash, code_bytes)?;
        let (trial, findings) = if header.dry_run || header.verify {
            self.try_module(&header, &shared, limits).await?
        } else {
            (None, Vec::new())
        };
        if header.dry_run {
            return Ok(api::DeployReply {
                module_sha256: hash,
                index: 0,
                dry_run: true,
                version: 0,
                unchanged: false,
                trial,
                findings,
            });
        }
        let findings = forced_findings(&header, findings)?;
        let engine = self.runtime.fingerprint().to_owned();
        let service = header.service;
        let entry = match held {
            Held::Stored => Request::DeployStored {
                service,
                module: hash,
                size,
                engine,
                limits,
                timestamp_ms: now_ms(),
                findings,
            },
            // A member of an earlier release: the entry carries the bytes, as it did there.
            Held::Inline => {
                let module = Arc::try_unwrap(shared).unwrap_or_else(|m| m.as_ref().clone());
                inline_deploy(service, module, engine, limits, findings)
            }
        };
        steps.tell(api::deploy_step::Kind::Proposed, |s| {
            s.node = self.router.id();
        });
        self.propose_swap(entry, "deploy").await
    }

    /// The reply to a deploy of what `service` already runs, as it runs it (a deploy retried
    /// after its connection dropped, though the first attempt went through): it changes
    /// nothing, adding neither an entry nor a version.
    fn already_running(
        &self,
        service: &str,
        module: &[u8],
        limits: ServiceLimits,
    ) -> Option<api::DeployReply> {
        let sha = crate::runtime::ModuleHash::of(module).to_hex();
        let active = self
            .state
            .services()
            .into_iter()
            .find(|s| s.name == service)
            .and_then(|s| s.history.last().cloned())
            .filter(|v| v.module == sha && v.limits == limits)?;
        Some(api::DeployReply {
            module_sha256: sha,
            index: active.deployed_at,
            dry_run: false,
            version: active.version,
            unchanged: true,
            ..Default::default()
        })
    }

    /// `Waft.Rollback`.
    pub(super) async fn rollback(
        &self,
        caller: &Caller,
        req: api::RollbackRequest,
    ) -> Result<GrpcResponse<api::DeployReply>, Status> {
        if let Some(leader) = self.router.leader(caller).await? {
            return leader
                .relay(req, |mut c, r| async move { c.waft.rollback(r).await })
                .await;
        }
        self.rollback_here(req, &Steps::default())
            .await
            .map(GrpcResponse::new)
    }

    /// A rollback on this node, the leader: the version's checks, the members' compiles, the
    /// proposal; each step told to `steps`.
    async fn rollback_here(
        &self,
        req: api::RollbackRequest,
        steps: &Steps,
    ) -> Result<api::DeployReply, Status> {
        let to = (req.to_version != 0).then_some(req.to_version);
        if !self.state.services().iter().any(|s| s.name == req.service) {
            return Err(Status::not_found(format!(
                "no service named {:?}",
                req.service
            )));
        }
        // Validate like a deploy: the target version must exist and accept the current state.
        let (version, module, limits) = self
            .state
            .version_module(&req.service, to)
            .await
            .ok_or_else(|| {
                Status::failed_precondition(match to {
                    Some(v) => format!("service {:?} has no kept version {v}", req.service),
                    None => format!(
                        "service {:?} has no earlier version to roll back to",
                        req.service
                    ),
                })
            })?;
        let started = std::time::Instant::now();
        let (hash, code_bytes) = self
            .validate(
                &req.service,
                module.clone(),
                limits,
                &format!("version {version}"),
            )
            .await?;
        steps.tell(api::deploy_step::Kind::Checked, |s| {
            s.node = self.router.id();
            s.millis = started.elapsed().as_millis() as u64;
        });
        self.check_budget(&req.service, limits, &hash, code_bytes)?;
        // The members hold it (it is a kept version), but may have dropped it from memory (a
        // restart) or lost the file: compile or fetch it before the switch. A member that
        // cannot fetches it when it applies the rollback.
        let reserve = self.reserve(&req.service, limits);
        match self
            .hold_members(&hash, module.len() as u64, &reserve, steps)
            .await
        {
            Err(e) if e.code() == tonic::Code::ResourceExhausted => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e.message(), "rolling back although not every voter holds the module")
            }
            Ok(_) => {}
        }
        let entry = Request::Rollback {
            service: req.service.clone(),
            to: Some(version),
            timestamp_ms: now_ms(),
        };
        steps.tell(api::deploy_step::Kind::Proposed, |s| {
            s.node = self.router.id();
        });
        self.propose_swap(entry, "rollback").await
    }

    /// Refuses a change that would take this node's guest memory reservation over its budget
    /// (see [`crate::budget`]).
    fn check_budget(
        &self,
        service: &str,
        limits: ServiceLimits,
        hash: &str,
        code_bytes: u64,
    ) -> Result<(), Status> {
        let module = crate::runtime::ModuleHash::from_hex(hash)
            .ok_or_else(|| Status::internal("a module hash that is not one"))?;
        crate::budget::check_change(
            &self.state,
            service,
            self.reserve(service, limits).memory_limit,
            module,
            code_bytes,
            self.limits.max_guest_memory,
        )
        .map_err(Status::resource_exhausted)
    }

    /// Checks, before anything is proposed, that `module` compiles, implements the world and
    /// accepts the current state of `service` in a throwaway instance (what applying the swap
    /// will do). Returns the module's sha256. The compiled module stays cached for the apply.
    async fn validate(
        &self,
        service: &str,
        module: Arc<Vec<u8>>,
        limits: ServiceLimits,
        what: &str,
    ) -> Result<(String, u64), Status> {
        let current = self.state.service_state(service).await.map_err(|e| {
            Status::unavailable(format!("cannot read the current state of {service:?}: {e}"))
        })?;
        let runtime = self.runtime.clone();
        let (service, what) = (service.to_owned(), what.to_owned());
        tokio::task::spawn_blocking(move || -> Result<(String, u64), Status> {
            let refused = |e: &dyn std::fmt::Display| Status::invalid_argument(format!("module refused: {e}"));
            let loaded = runtime.load(&module).map_err(|e| refused(&e))?;
            let mut trial = runtime
                .instantiate_with(&loaded, &service, limits.apply_to(runtime.limits().clone()))
                .map_err(|e| refused(&e))?;
            if let Some(state) = current {
                trial.restore(&state).map_err(|e| {
                    Status::failed_precondition(format!(
                        "{what} refused the current state of {service:?}, so the running version stays: {e}"
                    ))
                })?;
            }
            Ok((loaded.hash().to_hex(), loaded.info().code_bytes as u64))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    /// Runs the new module beside the running one on the service's history (or the header's
    /// commands) and, if asked, the determinism verifier on those commands.
    async fn try_module(
        &self,
        header: &api::DeployHeader,
        module: &[u8],
        limits: ServiceLimits,
    ) -> Result<(Option<api::TrialReport>, Vec<String>), Status> {
        let state = self.state.clone();
        let runtime = self.runtime.clone();
        let (service, bytes) = (header.service.clone(), module.to_vec());
        let file = (!header.replay.is_empty()).then(|| header.replay.clone());
        let verify = header.verify;
        tokio::task::spawn_blocking(move || {
            let running = state.running(&service);
            let loaded = runtime
                .load(&bytes)
                .map_err(|e| Status::invalid_argument(format!("module refused: {e}")))?;
            let new_limits = limits.apply_to(runtime.limits().clone());
            let trial = match &running {
                None => None,
                Some(r) => Some(
                    crate::trial::trial(
                        &runtime,
                        &service,
                        r,
                        &loaded,
                        new_limits,
                        file.as_deref(),
                    )
                    .map_err(Status::failed_precondition)?,
                ),
            };
            let mut findings = Vec::new();
            if verify {
                let commands = match (&trial, &file) {
                    (Some(t), _) => t.replayed.clone(),
                    (None, Some(f)) => f.clone(),
                    (None, None) => Vec::new(),
                };
                if commands.is_empty() {
                    return Err(Status::invalid_argument(
                        "--verify needs commands: the service has applied none since its last \
                         rebase; give some with --replay FILE",
                    ));
                }
                let report = crate::verify::verify_fresh(
                    runtime.limits().clone(),
                    runtime.cache_dir().map(std::path::Path::to_path_buf),
                    &bytes,
                    commands,
                )
                .map_err(|e| Status::internal(format!("the verifier failed: {e}")))?;
                findings = report.findings.iter().map(ToString::to_string).collect();
            }
            let trial = trial.map(convert::trial_report);
            Ok((trial, findings))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    /// Puts `module` into this node's module store (the members fetch it from here) and
    /// returns its sha256.
    async fn keep_module(&self, module: Arc<Vec<u8>>) -> Result<String, Status> {
        let store = self.state.modules().clone();
        tokio::task::spawn_blocking(move || store.insert(&module))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(|h| h.to_hex())
            .map_err(|e| {
                Status::resource_exhausted(format!(
                    "this node cannot keep the module in its module store, so it was not \
                     deployed: {e}"
                ))
            })
    }

    /// What a member asked to hold a module for `service` checks against its budget.
    fn reserve(&self, service: &str, limits: ServiceLimits) -> crate::raft::modules::Reserve {
        crate::raft::modules::Reserve {
            service: service.to_owned(),
            memory_limit: limits
                .max_memory_bytes
                .unwrap_or(self.state.default_memory_limit()),
        }
    }

    /// Has every other member hold module `sha256` (fetched from this node, or from a member
    /// that has it already) and compile it, and waits until a majority of the voters, this one
    /// included, holds it: a deploy entry that names a module by hash commits only where a
    /// majority can run it, and a node that lacks it later fetches it from one of them. The
    /// others get as long again as the majority took (at least 10 s; [`PREPARE_DEADLINE`] in
    /// all): a member that compiles at apply time stalls its own Raft for that long, harmless
    /// to the quorum but not to its clients. A member of an earlier release (no module store)
    /// makes it [`Held::Inline`]: the entry must carry the bytes.
    async fn hold_members(
        &self,
        sha256: &str,
        size: u64,
        reserve: &crate::raft::modules::Reserve,
        steps: &Steps,
    ) -> Result<Held, Status> {
        use crate::raft::modules::{HoldError, hold_module};
        use futures::StreamExt;
        let m = self.router.metrics();
        let id = self.router.id();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let others: Vec<(u64, String)> = membership
            .nodes()
            .filter(|(other, _)| **other != id)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        // A majority of the voters, less this node.
        let needed = voters.len() / 2;
        if others.is_empty() {
            return Ok(Held::Stored);
        }
        steps.tell(api::deploy_step::Kind::MembersAsked, |s| {
            s.nodes = others.iter().map(|(id, _)| *id).collect();
            s.needed = needed as u32;
        });
        let me = membership.get_node(&id).map(|n| (id, n.addr.clone()));
        let started = std::time::Instant::now();
        let mut calls: futures::stream::FuturesUnordered<_> = others
            .iter()
            .cloned()
            .map(|(id, addr)| {
                // This node first, then the others (one that fetched it may serve it too).
                let sources: Vec<(u64, String)> = me
                    .iter()
                    .cloned()
                    .chain(others.iter().filter(|(o, _)| *o != id).cloned())
                    .collect();
                let (peers, sha, reserve) = (
                    self.router.peers().clone(),
                    sha256.to_owned(),
                    reserve.clone(),
                );
                async move {
                    let r = hold_module(
                        &peers,
                        id,
                        &addr,
                        &sha,
                        size,
                        &sources,
                        Some(&reserve),
                        PREPARE_DEADLINE,
                    )
                    .await;
                    (id, r)
                }
            })
            .collect();
        let mut ready = 0;
        let mut errors = Vec::new();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let next = match grace {
                None => calls.next().await,
                Some(until) => match tokio::time::timeout_at(until, calls.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            let Some((node, answer)) = next else { break };
            match answer {
                Ok(compile_ms) => {
                    if voters.contains(&node) {
                        ready += 1;
                    }
                    steps.tell(api::deploy_step::Kind::MemberReady, |s| {
                        s.node = node;
                        s.millis = compile_ms;
                    });
                    tracing::info!(
                        node,
                        compile_ms,
                        "a member holds and compiled the module to deploy"
                    );
                }
                Err(HoldError::Unsupported) => {
                    tracing::info!(
                        node,
                        "a member of an earlier release: the deploy entry carries the module"
                    );
                    return Ok(Held::Inline);
                }
                Err(HoldError::OverBudget(e)) => {
                    return Err(Status::resource_exhausted(format!(
                        "not deployed, nothing was proposed: {e}"
                    )));
                }
                Err(HoldError::Failed(e)) => {
                    tracing::warn!(node, error = %e, "a member does not hold the module");
                    steps.tell(api::deploy_step::Kind::MemberFailed, |s| {
                        s.node = node;
                        s.detail = e.clone();
                    });
                    errors.push(e);
                }
            }
            if ready >= needed && grace.is_none() {
                let more = started.elapsed().max(std::time::Duration::from_secs(10));
                grace = Some(tokio::time::Instant::now() + more);
            }
        }
        tracing::info!(
            ready,
            needed,
            ms = started.elapsed().as_millis() as u64,
            "members hold the module"
        );
        if ready < needed {
            return Err(Status::unavailable(format!(
                "only {} of the {} voters hold the module (a majority must before the deploy is \
                 proposed), so it was not deployed: {}",
                ready + 1,
                voters.len(),
                errors.join("; ")
            )));
        }
        Ok(Held::Stored)
    }

    /// Waits for this node's turn to deploy to `service` (see `Api::deploying`).
    async fn deploy_turn(&self, service: &str) -> DeployTurn {
        let lock = crate::sync::lock_anyway(&self.deploying)
            .entry(service.to_owned())
            .or_default()
            .clone();
        DeployTurn {
            guard: Some(lock.lock_owned().await),
            service: service.to_owned(),
            all: self.deploying.clone(),
        }
    }

    /// Proposes a deploy or rollback entry on this (leader) node and maps the outcome.
    async fn propose_swap(&self, entry: Request, what: &str) -> Result<api::DeployReply, Status> {
        match self.router.write(entry, &Caller::local()).await? {
            Ok((index, Response::Deployed { module, version })) => Ok(api::DeployReply {
                module_sha256: module,
                index,
                dry_run: false,
                version,
                unchanged: false,
                ..Default::default()
            }),
            Ok((_, Response::DeployFailed(why))) => {
                Err(Status::failed_precondition(format!("{what} failed: {why}")))
            }
            Ok((_, Response::NoSuchService(s))) => {
                Err(Status::not_found(format!("no service named {s:?}")))
            }
            Ok((_, other)) => Err(Status::internal(format!(
                "unexpected response to a {what}: {other:?}"
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "leadership moved during the {what}; retry"
            ))),
        }
    }
}

/// A deploy's turn on its service; the service's lock is forgotten once nobody holds or waits
/// for it.
struct DeployTurn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    service: String,
    all: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// What the determinism verifier found, as the deploy entry keeps it: refused unless the
/// deploy is forced (then logged).
fn forced_findings(
    header: &api::DeployHeader,
    findings: Vec<String>,
) -> Result<Option<String>, Status> {
    if findings.is_empty() {
        return Ok(None);
    }
    if !header.force {
        return Err(Status::failed_precondition(format!(
            "the determinism verifier found {} problem(s) with the new module, so it was not \
             deployed (deploy with --force to override):\n{}",
            findings.len(),
            findings.join("\n")
        )));
    }
    tracing::warn!(
        service = %header.service,
        findings = findings.len(),
        "deploying a module the determinism verifier flagged (forced)"
    );
    Ok(Some(findings.join("\n")))
}

/// A deploy entry that carries its module, for a cluster with a member of an earlier release.
fn inline_deploy(
    service: String,
    module: Vec<u8>,
    engine: String,
    limits: ServiceLimits,
    findings: Option<String>,
) -> Request {
    match findings {
        Some(findings) => Request::ForcedDeploy {
            service,
            module,
            engine,
            limits,
            timestamp_ms: now_ms(),
            findings,
        },
        None => Request::Deploy {
            service,
            module,
            engine,
            limits,
            timestamp_ms: now_ms(),
        },
    }
}

impl Drop for DeployTurn {
    fn drop(&mut self) {
        self.guard.take();
        let mut all = crate::sync::lock_anyway(&self.all);
        if all
            .get(&self.service)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            all.remove(&self.service);
        }
    }
}
