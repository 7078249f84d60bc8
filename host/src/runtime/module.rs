//! Loading a guest: validating the bytes, compiling (or loading a cached compilation),
//! checking the world it targets and what it imports.

use super::bindings::{FsmVersion, Pre};
use super::error::LoadError;
use super::functions::FunctionCache;
use super::wasi::HostState;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::Engine;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};

/// The interface a guest exports, in the newest version this host speaks (it runs
/// [`FsmVersion::V0_1`] guests too).
pub const STATE_MACHINE_EXPORT: &str = "waft:fsm/state-machine@0.2.0";
/// The host interface guests may import (each version has its own; this is the newest).
pub const HOST_IMPORT: &str = "waft:fsm/host@0.2.0";
/// waft's interfaces a guest may import, by version: host (logging), types, and in 0.2.0
/// timers and events.
const WAFT_IMPORTS: &[&str] = &[
    "waft:fsm/host@0.1.0",
    "waft:fsm/types@0.1.0",
    "waft:fsm/host@0.2.0",
    "waft:fsm/types@0.2.0",
    "waft:fsm/timers@0.2.0",
    "waft:fsm/events@0.2.0",
];

/// WASI interfaces waft links, deterministically (see `wasi.rs`). Filesystem and sockets are
/// linked because language runtimes (CPython, StarlingMonkey, Rust's std with `std::net`) import
/// them whether or not the guest uses them, but every call fails the same way on every replica:
/// there is no preopened directory and every socket, connection and name lookup is refused.
/// HTTP and anything else are refused when the module is loaded, not when a guest first calls
/// them.
const ALLOWED_IMPORT_PREFIXES: &[&str] = &[
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:cli/",
    "wasi:filesystem/",
    "wasi:sockets/",
];

/// The sha256 of a module's bytes: its identity everywhere in waft.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleHash(pub [u8; 32]);

impl ModuleHash {
    /// Hashes module bytes.
    pub fn of(bytes: &[u8]) -> ModuleHash {
        ModuleHash(Sha256::digest(bytes).into())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex_digits: &str) -> Option<ModuleHash> {
        let bytes = hex::decode(hex_digits).ok()?;
        Some(ModuleHash(bytes.try_into().ok()?))
    }

    /// The hash as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleHash({})", &self.to_hex()[..12])
    }
}

/// What waft learned about a module while loading it.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    /// sha256 of the bytes.
    pub hash: ModuleHash,
    /// Size of the bytes.
    pub size: usize,
    /// Every interface the component imports, sorted.
    pub imports: Vec<String>,
    /// Every interface or function the component exports, sorted.
    pub exports: Vec<String>,
    /// Whether it imports WASI clocks (then it is never given batches).
    pub uses_clocks: bool,
    /// Whether it imports WASI randomness (then its stream is reseeded per entry).
    pub uses_random: bool,
    /// The version of waft's contract it speaks.
    pub fsm: FsmVersion,
    /// Whether it imports timers or events (then its effects are taken entry by entry, and it
    /// is never given batches).
    pub uses_effects: bool,
    /// Time spent compiling, or loading the compiled artifact from the cache.
    pub load_time: Duration,
    /// Whether the compiled artifact came from the on-disk cache.
    pub from_disk_cache: bool,
    /// Size of its compiled code in memory (shared by every service and version running it).
    pub code_bytes: usize,
}

impl ModuleInfo {
    /// Whether `apply-batch` may be used: only when no per-entry WASI value can be observed.
    pub fn can_batch(&self) -> bool {
        !self.uses_clocks && !self.uses_random && !self.uses_effects
    }

    /// Whether it can be given timers (it exports `fire`).
    pub fn fires_timers(&self) -> bool {
        self.fsm == FsmVersion::V0_2
    }
}

/// A compiled, validated guest ready to be instantiated any number of times.
pub struct GuestModule {
    pub(super) info: ModuleInfo,
    pub(super) pre: Pre<HostState>,
}

impl GuestModule {
    /// What waft learned about the module.
    pub fn info(&self) -> &ModuleInfo {
        &self.info
    }

    /// The module's identity.
    pub fn hash(&self) -> ModuleHash {
        self.info.hash
    }
}

impl fmt::Debug for GuestModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestModule")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Checks the header: is it wasm, and a component rather than a core module?
pub(super) fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    // Core modules have version 1, layer 0; components have layer 1 in bytes 6..8.
    match bytes[6..8] {
        [0, 0] => Err(LoadError::CoreModule),
        [1, 0] => Ok(()),
        _ => Err(LoadError::Invalid(format!(
            "unknown WebAssembly layer {:?}",
            &bytes[4..8]
        ))),
    }
}

/// Lowers the calling thread's CPU priority (nice 10; on Linux it applies to one thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only changes the scheduling priority of the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

/// Compiles a component on a thread of its own at a lower CPU priority, and makes wasmtime's
/// parallel compile workers (rayon's global pool) low priority as well. A large component
/// (CPython or a JS engine inside) keeps every core busy for seconds, and on the same machine
/// Raft's heartbeats must keep winning the CPU, or a deploy costs an election.
///
/// The compiling is done by an engine of its own, dropped when it is done, and the code is then
/// loaded into `engine`: Cranelift keeps a context per compiler thread in its engine for reuse,
/// each grown to the largest function it compiled, and for a Python guest they held ~77 MB per
/// node for good (a heap profile, docs/benchmarks.md). Returns the component and its compiled
/// code (what the disk cache keeps).
fn compile(
    functions: Option<&Arc<FunctionCache>>,
    engine: &Engine,
    bytes: &[u8],
) -> wasmtime::Result<(Component, Vec<u8>)> {
    static POOL: std::sync::Once = std::sync::Once::new();
    POOL.call_once(|| {
        let built = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("waft-compile-{i}"))
            .spawn_handler(|worker| {
                let mut b = std::thread::Builder::new();
                if let Some(name) = worker.name() {
                    b = b.name(name.to_owned());
                }
                b.spawn(move || {
                    lower_priority();
                    worker.run();
                })?;
                Ok(())
            })
            .build_global();
        if let Err(e) = built {
            // Someone built the global pool first: compiling still works, at normal priority.
            tracing::debug!(error = %e, "compiler threads keep their priority");
        }
    });
    let code = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("waft-compile".into())
            .spawn_scoped(scope, || {
                lower_priority();
                super::engine::build(functions.cloned())?.precompile_component(bytes)
            })
            .map_err(wasmtime::Error::from)?
            .join()
            .unwrap_or_else(|_| Err(wasmtime::Error::msg("the compiler panicked")))
    })?;
    // SAFETY: the code was just compiled by an engine with the same configuration as `engine`
    // (both come from `engine::build`), and wasmtime checks that on load.
    let component = unsafe { Component::deserialize(engine, &code) }?;
    Ok((component, code))
}

/// Where the disk cache in `dir` keeps the compiled code of module `hash` for engines with
/// artifact key `key`.
pub(super) fn artifact_path(dir: &Path, hash: &ModuleHash, key: &str) -> PathBuf {
    dir.join(format!("{hash}-{key}.cwasm"))
}

/// Compiles `bytes` or loads them from the disk cache, then validates and links them.
pub(super) fn load(
    engine: &Engine,
    functions: Option<&Arc<FunctionCache>>,
    linker: &Linker<HostState>,
    bytes: &[u8],
    cache: Option<(&Path, &str)>,
) -> Result<GuestModule, LoadError> {
    check_header(bytes)?;
    let hash = ModuleHash::of(bytes);
    let started = Instant::now();
    let cache_path: Option<PathBuf> = cache.map(|(dir, key)| artifact_path(dir, &hash, key));
    let mut from_disk_cache = false;
    let mut component = None;
    if let Some(path) = cache_path.as_deref().filter(|p| p.exists()) {
        // Read the artifact into memory rather than mapping the file: a mapped file that is
        // truncated or rewritten under us (by an operator, another node sharing the directory)
        // would crash the process with SIGBUS.
        let loaded = std::fs::read(path)
            .map_err(wasmtime::Error::from)
            .and_then(|artifact| {
                // SAFETY: the artifact was written into this node's cache directory by
                // `Component::serialize` of a wasmtime build with this engine's compatibility
                // key (the file name carries it): by this node, by another node sharing the
                // directory, or fetched from the member that compiled it (`--share-compiled`,
                // only under mutual TLS: see `storage/compiled.rs`), so the cache directory and
                // those members are trusted. wasmtime checks the header and the engine
                // configuration on load; it cannot check the machine code itself.
                unsafe { Component::deserialize(engine, &artifact) }
            });
        match loaded {
            Ok(c) => {
                component = Some(c);
                from_disk_cache = true;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unusable cached component; recompiling");
            }
        }
    }
    let (component, compiled) = match component {
        Some(c) => (c, None),
        None => {
            let (c, code) = compile(functions, engine, bytes)
                .map_err(|e| LoadError::Invalid(root_message(&e)))?;
            (c, Some(code))
        }
    };
    let (imports, exports) = inspect(engine, &component);
    let fsm = check_world(&imports, &exports)?;
    let instance_pre = linker.instantiate_pre(&component).map_err(|e| {
        LoadError::UnsupportedImport(format!("cannot link the guest: {}", root_message(&e)))
    })?;
    let pre = Pre::new(fsm, instance_pre).map_err(|e| {
        LoadError::WrongWorld(format!(
            "guest does not match waft's world ({fsm}): {}",
            root_message(&e)
        ))
    })?;
    if let (Some(path), Some(code)) = (&cache_path, &compiled) {
        write_cache(code, path)?;
    }
    drop(compiled);
    let uses = |prefix: &str| imports.iter().any(|i| i.starts_with(prefix));
    let image = component.image_range();
    let info = ModuleInfo {
        code_bytes: (image.end as usize).saturating_sub(image.start as usize),
        hash,
        size: bytes.len(),
        uses_clocks: uses("wasi:clocks/"),
        uses_random: uses("wasi:random/"),
        fsm,
        uses_effects: uses("waft:fsm/timers@") || uses("waft:fsm/events@"),
        imports,
        exports,
        load_time: started.elapsed(),
        from_disk_cache,
    };
    Ok(GuestModule { info, pre })
}

fn write_cache(bytes: &[u8], path: &Path) -> Result<(), LoadError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| LoadError::Cache(format!("cannot create {}: {e}", dir.display())))?;
    // Write a file of this writer's own, then rename it, so a crash never leaves a half-written
    // artifact under the real name and two loads of one module at once (two nodes sharing the
    // cache, or two services) never rename each other's file away.
    let cannot_write =
        |e: std::io::Error| LoadError::Cache(format!("cannot write {}: {e}", path.display()));
    let mut tmp = tempfile::Builder::new()
        .prefix(".cwasm-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(cannot_write)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(cannot_write)?;
    tmp.persist(path)
        .map(drop)
        .map_err(|e| cannot_write(e.error))
}

/// Lists the component's imports and exports by name.
fn inspect(engine: &Engine, component: &Component) -> (Vec<String>, Vec<String>) {
    let ty = component.component_type();
    let mut imports: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    let mut exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, item)| match item.ty {
            ComponentItem::ComponentFunc(_) => format!("{name} (function)"),
            _ => name.to_owned(),
        })
        .collect();
    imports.sort();
    exports.sort();
    (imports, exports)
}

/// Checks that the guest exports the state machine (of a version this host speaks) and imports
/// only what waft provides, for that version; returns the version.
fn check_world(imports: &[String], exports: &[String]) -> Result<FsmVersion, LoadError> {
    let Some(fsm) = [FsmVersion::V0_2, FsmVersion::V0_1]
        .into_iter()
        .find(|v| exports.iter().any(|e| e == v.export()))
    else {
        let found = if exports.is_empty() {
            "nothing".to_owned()
        } else {
            exports.join(", ")
        };
        return Err(LoadError::WrongWorld(format!(
            "the component does not export {} or {} (it exports {found}); \
             build it against waft's WIT (world waft:fsm/guest), for instance with the waft-guest crate",
            FsmVersion::V0_2.export(),
            FsmVersion::V0_1.export(),
        )));
    };
    let own = format!("@{}", fsm.number());
    let refused: Vec<&str> = imports
        .iter()
        .map(String::as_str)
        .filter(|i| {
            let waft_own = WAFT_IMPORTS.contains(i) && i.ends_with(&own);
            let wasi = ALLOWED_IMPORT_PREFIXES.iter().any(|p| i.starts_with(p));
            !waft_own && !wasi
        })
        .collect();
    if !refused.is_empty() {
        return Err(LoadError::UnsupportedImport(format!(
            "the component imports {}, which waft does not provide: guests get no host \
             services beyond waft's own of the guest's version ({fsm}: host{}) and \
             deterministic WASI (clocks, randomness, stdio; files and sockets are linked but \
             always refused); build without them (for ComponentizeJS: --disable http)",
            refused.join(", "),
            match fsm {
                FsmVersion::V0_1 => "",
                FsmVersion::V0_2 => ", timers, events",
            }
        )));
    }
    Ok(fsm)
}

/// The innermost message of an error chain: the part a person can act on.
pub(super) fn root_message(e: &wasmtime::Error) -> String {
    let root = e.root_cause().to_string();
    let top = e.to_string();
    if root == top || top.contains(&root) {
        top
    } else {
        format!("{top}: {root}")
    }
}
