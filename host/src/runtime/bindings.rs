//! The generated bindings of both versions of the guest contract, and one type over them.
//!
//! `wit/fsm.wit` is `waft:fsm@0.1.0`; `wit/v0.2/fsm.wit` is `waft:fsm@0.2.0` (timers, events,
//! `fire`). A module is one or the other, decided by the state machine interface it exports;
//! [`Bindings`] makes the calls of either through one set of methods, so the rest of the
//! runtime does not care which version a guest speaks, except for `fire`.

//!
//! This file knows nothing of the store's data (`wasi::HostState`, which implements what the
//! guest imports and links it): the types here are generic over it, so the files that use the
//! bindings are above it, never beside it in a ring.

use super::contain;
use wasmtime::Store;
use wasmtime::component::InstancePre;

/// The context of one applied entry, as both versions pass it (0.1.0's type).
type ApplyCtx = v1::waft::fsm::types::ApplyContext;

/// `waft:fsm@0.1.0`: one `bindgen!` per contract version.
pub(super) mod v1 {
    wasmtime::component::bindgen!({
        path: "../wit/fsm.wit",
        world: "guest",
    });
}

/// `waft:fsm@0.2.0`.
pub(super) mod v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2/fsm.wit",
        world: "guest",
    });
}

/// Which version of the contract a guest speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsmVersion {
    /// `waft:fsm@0.1.0`: commands only.
    V0_1,
    /// `waft:fsm@0.2.0`: timers, events and `fire`.
    V0_2,
}

impl FsmVersion {
    /// The state machine interface a guest of this version exports.
    pub fn export(self) -> &'static str {
        match self {
            FsmVersion::V0_1 => "waft:fsm/state-machine@0.1.0",
            FsmVersion::V0_2 => "waft:fsm/state-machine@0.2.0",
        }
    }

    /// The contract's version number.
    pub fn number(self) -> &'static str {
        match self {
            FsmVersion::V0_1 => "0.1.0",
            FsmVersion::V0_2 => "0.2.0",
        }
    }
}

impl std::fmt::Display for FsmVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "waft:fsm@{}", self.number())
    }
}

/// A module linked and checked against its version's world, ready to instantiate.
pub(super) enum Pre<T: 'static> {
    V0_1(v1::GuestPre<T>),
    V0_2(v2::GuestPre<T>),
}

impl<T: 'static> Pre<T> {
    pub(super) fn new(version: FsmVersion, pre: InstancePre<T>) -> wasmtime::Result<Pre<T>> {
        Ok(match version {
            FsmVersion::V0_1 => Pre::V0_1(v1::GuestPre::new(pre)?),
            FsmVersion::V0_2 => Pre::V0_2(v2::GuestPre::new(pre)?),
        })
    }

    pub(super) fn instantiate(&self, store: &mut Store<T>) -> wasmtime::Result<Bindings> {
        contain::call(|| {
            Ok(match self {
                Pre::V0_1(p) => Bindings::V0_1(p.instantiate(&mut *store)?),
                Pre::V0_2(p) => Bindings::V0_2(p.instantiate(&mut *store)?),
            })
        })
    }
}

/// A live instance's exports, of either version.
pub(super) enum Bindings {
    V0_1(v1::Guest),
    V0_2(v2::Guest),
}

type Reply = Result<Vec<u8>, String>;

fn ctx2(c: ApplyCtx) -> v2::waft::fsm::types::ApplyContext {
    v2::waft::fsm::types::ApplyContext {
        index: c.index,
        term: c.term,
        timestamp_ms: c.timestamp_ms,
    }
}

impl Bindings {
    pub(super) fn apply<T: 'static>(
        &self,
        store: &mut Store<T>,
        ctx: ApplyCtx,
        command: &[u8],
    ) -> wasmtime::Result<Reply> {
        contain::call(|| match self {
            Bindings::V0_1(g) => g.waft_fsm_state_machine().call_apply(store, ctx, command),
            Bindings::V0_2(g) => g
                .waft_fsm_state_machine()
                .call_apply(store, ctx2(ctx), command),
        })
    }

    pub(super) fn apply_batch<T: 'static>(
        &self,
        store: &mut Store<T>,
        entries: &[(ApplyCtx, &[u8])],
    ) -> wasmtime::Result<Vec<Reply>> {
        contain::call(|| match self {
            Bindings::V0_1(g) => {
                let batch: Vec<v1::waft::fsm::types::Entry> = entries
                    .iter()
                    .map(|(ctx, cmd)| v1::waft::fsm::types::Entry {
                        context: *ctx,
                        command: cmd.to_vec(),
                    })
                    .collect();
                g.waft_fsm_state_machine().call_apply_batch(store, &batch)
            }
            Bindings::V0_2(g) => {
                let batch: Vec<v2::waft::fsm::types::Entry> = entries
                    .iter()
                    .map(|(ctx, cmd)| v2::waft::fsm::types::Entry {
                        context: ctx2(*ctx),
                        command: cmd.to_vec(),
                    })
                    .collect();
                g.waft_fsm_state_machine().call_apply_batch(store, &batch)
            }
        })
    }

    /// `fire`, or `None` for a 0.1.0 guest (which has no timers to fire).
    pub(super) fn fire<T: 'static>(
        &self,
        store: &mut Store<T>,
        ctx: ApplyCtx,
        key: &str,
        payload: &[u8],
    ) -> Option<wasmtime::Result<Result<(), String>>> {
        match self {
            Bindings::V0_1(_) => None,
            Bindings::V0_2(g) => Some(contain::call(|| {
                g.waft_fsm_state_machine()
                    .call_fire(store, ctx2(ctx), key, payload)
            })),
        }
    }

    pub(super) fn query<T: 'static>(
        &self,
        store: &mut Store<T>,
        request: &[u8],
    ) -> wasmtime::Result<Reply> {
        contain::call(|| match self {
            Bindings::V0_1(g) => g.waft_fsm_state_machine().call_query(store, request),
            Bindings::V0_2(g) => g.waft_fsm_state_machine().call_query(store, request),
        })
    }

    pub(super) fn snapshot<T: 'static>(&self, store: &mut Store<T>) -> wasmtime::Result<Vec<u8>> {
        contain::call(|| match self {
            Bindings::V0_1(g) => g.waft_fsm_state_machine().call_snapshot(store),
            Bindings::V0_2(g) => g.waft_fsm_state_machine().call_snapshot(store),
        })
    }

    pub(super) fn restore<T: 'static>(
        &self,
        store: &mut Store<T>,
        bytes: &[u8],
    ) -> wasmtime::Result<Result<(), String>> {
        contain::call(|| match self {
            Bindings::V0_1(g) => g.waft_fsm_state_machine().call_restore(store, bytes),
            Bindings::V0_2(g) => g.waft_fsm_state_machine().call_restore(store, bytes),
        })
    }
}
