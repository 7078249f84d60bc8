//! The guest runtime: the only part of waft that touches wasmtime.
//!
//! A [`Runtime`] owns the engine (configured for deterministic execution), the linker with
//! waft's deterministic WASI and host interface, and a cache of compiled modules in memory and
//! on disk. [`Runtime::load`] validates and compiles a module; [`Runtime::instantiate`] makes a
//! [`Guest`], whose calls roll back completely when they trap.

mod bindings;
mod config;
mod contain;
mod effects;
mod engine;
mod error;
mod functions;
mod guest;
mod module;
mod nonblocking;
mod replay;
pub mod testing;
mod trap;
mod wasi;

pub use bindings::FsmVersion;
pub use config::{CHECKPOINT_BYTES_PER_ENTRY, CheckpointPolicy, Limits, RuntimeConfig};
pub use contain::{HostFault, host_faults, panic_message};
pub use effects::{
    Effect, MAX_EVENT_BYTES, MAX_EVENTS_PER_CALL, MAX_TIMER_KEY_BYTES, MAX_TIMER_PAYLOAD_BYTES,
};
pub use engine::WASMTIME_VERSION;
pub use error::OpenError;
pub use error::{GuestError, LoadError, TrapKind};
pub use guest::Guest;
pub use module::{GuestModule, HOST_IMPORT, ModuleHash, ModuleInfo, STATE_MACHINE_EXPORT};
pub use replay::{ApplyCtx, ReplayCall, ReplayEntry, ReplayForm, ReplayPoint};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasi::HostState;
use wasmtime::Engine;
use wasmtime::component::Linker;

/// One cache entry: empty until the module is compiled; its lock serializes compiles of it.
type ModuleSlot = Arc<Mutex<Option<Held>>>;

/// A compiled module in the runtime's memory cache.
enum Held {
    /// Kept for the life of the runtime: without a disk cache nothing would bring it back
    /// but a compile.
    Strong(Arc<GuestModule>),
    /// Kept while something uses it (a service's version, a trial): a module that no longer
    /// serves leaves memory, and loading it again reads its compiled artifact from the disk
    /// cache in milliseconds (issue 23).
    Weak(std::sync::Weak<GuestModule>),
}

impl Held {
    fn get(&self) -> Option<Arc<GuestModule>> {
        match self {
            Held::Strong(m) => Some(m.clone()),
            Held::Weak(m) => m.upgrade(),
        }
    }
}

/// Compiles, caches and instantiates guests. Cheap to clone; share one per node.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    /// The function cache every compiling engine shares (with a `cache_dir`).
    functions: Option<Arc<functions::FunctionCache>>,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    fingerprint: String,
    artifact_key: String,
    /// Compiled modules by hash (see [`Held`]: with a disk cache, only while something uses
    /// them; without one, for the life of the runtime). Each hash has its own
    /// lock, so two loads of the same module (a background precompile and the apply of the
    /// deploy) compile it once: the second waits for the first.
    modules: Mutex<HashMap<ModuleHash, ModuleSlot>>,
    /// Modules compiled here, and the microseconds that took.
    compiled: AtomicU64,
    compile_micros: AtomicU64,
    /// Modules loaded from compiled code in the disk cache.
    loaded: AtomicU64,
    /// The most recently loaded modules, kept in memory up to
    /// [`RuntimeConfig::compiled_cache_bytes`] of code after nothing else uses them.
    recent: Mutex<Recent>,
}

/// Strong references to the most recently loaded modules, newest last, bounded in bytes of
/// compiled code.
#[derive(Default)]
struct Recent {
    modules: std::collections::VecDeque<Arc<GuestModule>>,
    bytes: usize,
}

impl Recent {
    /// Puts `module` at the newest end and drops the oldest until at most `max` bytes stay.
    fn touch(&mut self, module: &Arc<GuestModule>, max: usize) {
        if max == 0 {
            return;
        }
        if let Some(at) = self.modules.iter().position(|m| Arc::ptr_eq(m, module))
            && let Some(m) = self.modules.remove(at)
        {
            self.bytes -= m.info.code_bytes;
        }
        self.bytes += module.info.code_bytes;
        self.modules.push_back(module.clone());
        while self.bytes > max {
            match self.modules.pop_front() {
                Some(m) => self.bytes -= m.info.code_bytes,
                None => break,
            }
        }
    }
}

/// What a runtime compiled and loaded since it started (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CompileStats {
    /// Modules compiled here.
    pub compiled: u64,
    /// Time those compiles took.
    pub compile_seconds: f64,
    /// Modules loaded from compiled code on disk (compiled here earlier, or fetched from a
    /// member that shares compiled code).
    pub loaded: u64,
    /// Compiled code held in memory now, bytes (see [`Runtime::resident_code_bytes`]).
    pub resident_code_bytes: u64,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("fingerprint", &self.inner.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine and the linker.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, LoadError> {
        let functions = config
            .cache_dir
            .as_deref()
            .map(|dir| Arc::new(functions::FunctionCache::new(&dir.join("functions"))));
        let engine = engine::build(functions.clone())
            .map_err(|e| LoadError::Invalid(format!("cannot build the engine: {e}")))?;
        let mut linker = Linker::new(&engine);
        let link =
            |e: wasmtime::Error| LoadError::Invalid(format!("cannot link host functions: {e}"));
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(link)?;
        nonblocking::link(&mut linker).map_err(link)?;
        wasi::add_to_linker(&mut linker).map_err(link)?;
        let fingerprint = engine::fingerprint(&config.limits, &config.checkpoints);
        let artifact_key = engine::artifact_key(&engine);
        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                functions,
                linker,
                config,
                fingerprint,
                artifact_key,
                modules: Mutex::new(HashMap::new()),
                compiled: AtomicU64::new(0),
                compile_micros: AtomicU64::new(0),
                loaded: AtomicU64::new(0),
                recent: Mutex::new(Recent::default()),
            }),
        })
    }

    /// The engine fingerprint: wasmtime release, determinism settings and outcome-changing
    /// limits. Replicas must agree on it.
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    /// The key compiled code carries in the disk cache: code made by an engine with another
    /// key does not load into this one.
    pub fn artifact_key(&self) -> &str {
        &self.inner.artifact_key
    }

    /// The disk cache's directory, if this runtime keeps one.
    pub fn cache_dir(&self) -> Option<&std::path::Path> {
        self.inner.config.cache_dir.as_deref()
    }

    /// Where the disk cache keeps (or would keep) the compiled code of module `hash`; `None`
    /// without a disk cache. A file put there is loaded like code compiled here (wasmtime
    /// checks that it was made for this engine, and it is compiled again if not), so only
    /// code from a trusted source may go there.
    pub fn artifact_path(&self, hash: &ModuleHash) -> Option<std::path::PathBuf> {
        let dir = self.inner.config.cache_dir.as_deref()?;
        Some(module::artifact_path(dir, hash, &self.inner.artifact_key))
    }

    /// What this runtime compiled and loaded so far.
    pub fn compile_stats(&self) -> CompileStats {
        CompileStats {
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            compile_seconds: self.inner.compile_micros.load(Ordering::Relaxed) as f64 / 1e6,
            loaded: self.inner.loaded.load(Ordering::Relaxed),
            resident_code_bytes: self.resident_code_bytes() as u64,
        }
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    /// Validates and compiles a module, or returns the already compiled one with the same hash.
    ///
    /// Errors are deterministic and say what is wrong: not wasm, a core module, an invalid
    /// component, the wrong world, an import waft does not provide, over the size cap.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<GuestModule>, LoadError> {
        let max = self.inner.config.limits.max_module_bytes;
        if bytes.len() > max {
            return Err(LoadError::TooLarge {
                size: bytes.len(),
                max,
            });
        }
        self.load_committed(bytes)
    }

    /// [`Runtime::load`] without this node's size cap, for a module the log already committed
    /// (a deploy entry, a snapshot, a heal): the cap is this node's rule for what it accepts,
    /// and refusing a committed module here would make this replica answer differently from
    /// the others.
    pub fn load_committed(&self, bytes: &[u8]) -> Result<Arc<GuestModule>, LoadError> {
        if bytes.is_empty() {
            return Err(LoadError::NotWasm);
        }
        let hash = ModuleHash::of(bytes);
        let slot = self.modules().entry(hash).or_default().clone();
        let mut slot = crate::sync::lock_anyway(&slot);
        if let Some(m) = slot.as_ref().and_then(Held::get) {
            self.keep_recent(&m);
            return Ok(m);
        }
        let cache = self
            .inner
            .config
            .cache_dir
            .as_deref()
            .map(|dir| (dir, self.inner.artifact_key.as_str()));
        let module = Arc::new(module::load(
            &self.inner.engine,
            self.inner.functions.as_ref(),
            &self.inner.linker,
            bytes,
            cache,
        )?);
        if module.info.from_disk_cache {
            self.inner.loaded.fetch_add(1, Ordering::Relaxed);
        } else {
            self.inner.compiled.fetch_add(1, Ordering::Relaxed);
            self.inner
                .compile_micros
                .fetch_add(module.info.load_time.as_micros() as u64, Ordering::Relaxed);
        }
        tracing::debug!(
            module = %hash,
            size = bytes.len(),
            load_ms = module.info.load_time.as_secs_f64() * 1e3,
            from_disk_cache = module.info.from_disk_cache,
            "guest module loaded"
        );
        *slot = Some(if cache.is_some() {
            Held::Weak(Arc::downgrade(&module))
        } else {
            Held::Strong(module.clone())
        });
        self.keep_recent(&module);
        Ok(module)
    }

    /// Keeps `module` among the recently loaded ones (with a disk cache and a memory budget
    /// for them; without a disk cache every module stays anyway).
    fn keep_recent(&self, module: &Arc<GuestModule>) {
        if self.inner.config.cache_dir.is_some() {
            crate::sync::lock_anyway(&self.inner.recent)
                .touch(module, self.inner.config.compiled_cache_bytes);
        }
    }

    /// Bytes of compiled code this runtime holds in memory (in use, or kept as recently
    /// loaded), each module once.
    pub fn resident_code_bytes(&self) -> usize {
        self.modules()
            .values()
            .filter_map(|slot| {
                crate::sync::try_lock_anyway(slot)
                    .and_then(|held| held.as_ref().and_then(Held::get))
            })
            .map(|m| m.info.code_bytes)
            .sum()
    }

    /// Creates a fresh instance (empty state) of a loaded module, opened outside any log entry
    /// (index 0). `label` names it in logs, usually the service name.
    pub fn instantiate(&self, module: &Arc<GuestModule>, label: &str) -> Result<Guest, LoadError> {
        self.instantiate_with(module, label, self.inner.config.limits.clone())
    }

    /// Like [`Runtime::instantiate`], with limits of the caller's choosing (a service's own).
    pub fn instantiate_with(
        &self,
        module: &Arc<GuestModule>,
        label: &str,
        limits: Limits,
    ) -> Result<Guest, LoadError> {
        self.open(module, label, limits, guest::ZERO_CTX, None)
            .map_err(|e| match e {
                OpenError::Load(l) => l,
                OpenError::Guest(g) => LoadError::Instantiate(g.to_string()),
            })
    }

    /// Opens a fresh instance at the entry `ctx`: the module's start-up code and then
    /// `restore(base)` (or, without a base, a warm-up `snapshot` call) run with that entry's
    /// clock and randomness. Every replica opens a service's instances at the same entries, so
    /// their histories are equal (see [`Guest`]).
    pub fn open(
        &self,
        module: &Arc<GuestModule>,
        label: &str,
        limits: Limits,
        ctx: ApplyCtx,
        base: Option<Arc<[u8]>>,
    ) -> Result<Guest, OpenError> {
        Guest::open(
            self.inner.engine.clone(),
            module.clone(),
            limits,
            self.inner.config.checkpoints.clone(),
            label,
            ctx,
            base,
        )
    }

    /// Rebuilds the guest a [`ReplayForm`] describes (a snapshot's, a backup's): the same
    /// instance history, so the same bytes as the instance it was taken from.
    pub fn from_replay(
        &self,
        module: &Arc<GuestModule>,
        label: &str,
        limits: Limits,
        form: &ReplayForm,
    ) -> Result<Guest, OpenError> {
        Guest::from_replay(
            self.inner.engine.clone(),
            module.clone(),
            limits,
            self.inner.config.checkpoints.clone(),
            label,
            form,
        )
    }

    fn modules(&self) -> std::sync::MutexGuard<'_, HashMap<ModuleHash, ModuleSlot>> {
        crate::sync::lock_anyway(&self.inner.modules)
    }
}
