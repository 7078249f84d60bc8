//! A guest component in the real runtime behind `waft_guest::testing::Target`, so a guest's
//! unit tests run the same script natively and on its `.wasm` (`waft::testing::Component`).

use super::{ApplyCtx, Effect, Guest, GuestModule, Runtime, RuntimeConfig};
use std::sync::Arc;
use waft_guest::testing::Effect as TestEffect;

/// A built guest component, instantiated in waft's runtime with the nodes' default limits
/// (fuel, memory, the deterministic WASI clocks and randomness).
pub struct Component {
    runtime: Runtime,
    module: Arc<GuestModule>,
    guest: Guest,
    /// Effects of the last successful apply or fire.
    effects: Vec<Effect>,
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Component").finish_non_exhaustive()
    }
}

impl Component {
    /// Loads and instantiates the component in `path` (a `.wasm`).
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Component, String> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Component::from_bytes(&bytes)
    }

    /// Loads and instantiates a component from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Component, String> {
        let runtime = Runtime::new(RuntimeConfig::default()).map_err(|e| e.to_string())?;
        let module = runtime.load(bytes).map_err(|e| e.to_string())?;
        let guest = runtime
            .instantiate(&module, "testing")
            .map_err(|e| e.to_string())?;
        Ok(Component {
            runtime,
            module,
            guest,
            effects: Vec::new(),
        })
    }
}

impl waft_guest::testing::Target for Component {
    fn fresh(&self) -> Component {
        let guest = self
            .runtime
            .instantiate(&self.module, "testing")
            .unwrap_or_else(|e| panic!("a second instance of a component that loaded: {e}"));
        Component {
            runtime: self.runtime.clone(),
            module: self.module.clone(),
            guest,
            effects: Vec::new(),
        }
    }

    fn apply(
        &mut self,
        index: u64,
        term: u64,
        timestamp_ms: u64,
        command: &[u8],
    ) -> Result<Vec<u8>, String> {
        let ctx = ApplyCtx {
            index,
            term,
            timestamp_ms,
        };
        let (result, effects) = self.guest.apply_effects(ctx, command, &mut |_| Ok(()));
        self.effects = effects;
        result.map_err(|e| e.to_string())
    }

    fn fire(
        &mut self,
        index: u64,
        term: u64,
        timestamp_ms: u64,
        key: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        let ctx = ApplyCtx {
            index,
            term,
            timestamp_ms,
        };
        let (result, effects) = self.guest.fire(ctx, key, payload, &mut |_| Ok(()));
        self.effects = effects;
        result.map_err(|e| e.to_string())
    }

    fn take_effects(&mut self) -> Vec<TestEffect> {
        std::mem::take(&mut self.effects)
            .into_iter()
            .map(|e| match e {
                Effect::SetTimer {
                    key,
                    at_ms,
                    payload,
                } => TestEffect::SetTimer {
                    key,
                    at_ms,
                    payload,
                },
                Effect::CancelTimer { key } => TestEffect::CancelTimer { key },
                Effect::Emit { topic, data } => TestEffect::Emit { topic, data },
            })
            .collect()
    }

    fn query(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.guest.query(request).map_err(|e| e.to_string())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, String> {
        self.guest.snapshot().map_err(|e| e.to_string())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.guest.restore(snapshot).map_err(|e| e.to_string())
    }
}
