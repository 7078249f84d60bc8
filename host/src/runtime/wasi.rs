//! The per-instance host state: a deterministic WASI, the resource limiter and guest logging.
//!
//! Guests built for `wasm32-wasip2` import WASI even when they never mean to touch the outside
//! world (Rust's std does). waft links a WASI in which nothing external is observable:
//! no preopened directories, sockets that refuse every bind, connect and name lookup
//! (`access-denied`, identically on every replica), no environment or arguments, an empty stdin; the wall
//! and monotonic clocks read the timestamp of the entry being applied; randomness is a ChaCha20
//! stream seeded from the module hash and the log index; stdout and stderr go to the host's logs
//! with a per-call cap (and the tail of stderr is kept to explain a trap).

use super::bindings::v1::{
    self,
    waft::fsm::host::{Host, Level},
};
use super::bindings::v2::waft::fsm as v2;
use super::config::Limits;
use super::effects::EffectLog;
use bytes::Bytes;
use chacha20::ChaCha20Rng;
use rand_core::{SeedableRng, TryRng};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use wasmtime::ResourceLimiter;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

/// Bytes of stderr kept per call to explain a trap (a Rust panic message, say).
const STDERR_TAIL: usize = 2048;

/// The store data of one guest instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: Limiter,
    pub(super) call: Arc<CallState>,
    /// Timers and events of the call in progress (0.2.0 guests; see `effects.rs`).
    pub(super) effects: EffectLog,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    /// Builds the state for a fresh instance of the module with the given hash.
    pub fn new(limits: &Limits, module_hash: [u8; 32], label: Arc<str>) -> HostState {
        let call = Arc::new(CallState {
            label,
            module_hash,
            timestamp_ms: AtomicU64::new(0),
            index: AtomicU64::new(0),
            opening: AtomicBool::new(true),
            rng: Mutex::new(ChaCha20Rng::from_seed([0; 32])),
            insecure_rng: Mutex::new(ChaCha20Rng::from_seed([0; 32])),
            output: Mutex::new(OutputBudget::new(limits)),
        });
        let mut seed = [0u8; 16];
        seed.copy_from_slice(&module_hash[..16]);
        let wasi = WasiCtx::builder()
            .wall_clock(DeterministicClock(call.clone()))
            .monotonic_clock(DeterministicClock(call.clone()))
            .secure_random(SharedRng {
                call: call.clone(),
                insecure: false,
            })
            .insecure_random(SharedRng {
                call: call.clone(),
                insecure: true,
            })
            .insecure_random_seed(u128::from_le_bytes(seed))
            .stdout(GuestOutput {
                call: call.clone(),
                stream: Stream::Stdout,
            })
            .stderr(GuestOutput {
                call: call.clone(),
                stream: Stream::Stderr,
            })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                max_memory: limits.max_memory_bytes,
                max_table: limits.max_table_elements,
                hit: None,
                memory_bytes: 0,
            },
            call,
            effects: Default::default(),
        }
    }
}

/// What the host knows about the call in progress: the entry's facts and the output budget.
pub struct CallState {
    label: Arc<str>,
    module_hash: [u8; 32],
    timestamp_ms: AtomicU64,
    index: AtomicU64,
    /// True while the instance is being opened: its monotonic clock then reads 0 (see
    /// [`DeterministicClock`]).
    opening: AtomicBool,
    rng: Mutex<ChaCha20Rng>,
    insecure_rng: Mutex<ChaCha20Rng>,
    output: Mutex<OutputBudget>,
}

/// Which call a random stream is seeded for; part of the seed so that a query and an apply at
/// the same index do not share a stream.
#[derive(Debug, Clone, Copy)]
pub enum CallKind {
    Apply = 1,
    Query = 2,
    Snapshot = 3,
    /// The module's start-up code, when an instance is created.
    Instantiate = 5,
    /// The first call on a new instance (`restore`, or the warm-up `snapshot`).
    Open = 6,
}

impl CallState {
    /// Prepares for a call made on behalf of the entry at `index` with the given timestamp.
    /// `reseed` is false for guests that do not import WASI randomness (seeding costs a hash).
    pub fn begin(
        &self,
        kind: CallKind,
        index: u64,
        timestamp_ms: u64,
        reseed: bool,
        limits: &Limits,
    ) {
        self.index.store(index, Ordering::Relaxed);
        self.timestamp_ms.store(timestamp_ms, Ordering::Relaxed);
        self.opening.store(
            matches!(kind, CallKind::Instantiate | CallKind::Open),
            Ordering::Relaxed,
        );
        if reseed {
            for (stream, rng) in [(0u8, &self.rng), (1u8, &self.insecure_rng)] {
                let mut h = Sha256::new();
                h.update(b"waft-random-v1\0");
                h.update(self.module_hash);
                h.update(index.to_le_bytes());
                h.update([kind as u8, stream]);
                let seed: [u8; 32] = h.finalize().into();
                *lock_anyway(rng) = ChaCha20Rng::from_seed(seed);
            }
        }
        *lock_anyway(&self.output) = OutputBudget::new(limits);
    }

    /// Ends a call: flushes partial output lines and reports what the budget dropped.
    pub fn finish(&self) {
        let mut out = lock_anyway(&self.output);
        let index = self.index.load(Ordering::Relaxed);
        let partials = [
            (Stream::Stdout, std::mem::take(&mut out.stdout_line)),
            (Stream::Stderr, std::mem::take(&mut out.stderr_line)),
        ];
        for (stream, line) in partials {
            if !line.is_empty() {
                emit_output(&self.label, index, stream, &line);
            }
        }
        if out.dropped_bytes > 0 || out.dropped_lines > 0 {
            tracing::warn!(
                target: "waft::guest",
                service = %self.label,
                index = self.index.load(Ordering::Relaxed),
                dropped_output_bytes = out.dropped_bytes,
                dropped_log_lines = out.dropped_lines,
                "guest output over the per-call limit was dropped"
            );
        }
    }

    /// The tail of what the guest wrote to stderr during the call (explains a trap).
    pub fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&lock_anyway(&self.output).stderr_tail).into_owned()
    }
}

use crate::sync::lock_anyway;

struct OutputBudget {
    bytes_left: usize,
    lines_left: u32,
    dropped_bytes: usize,
    dropped_lines: u32,
    stdout_line: Vec<u8>,
    stderr_line: Vec<u8>,
    stderr_tail: Vec<u8>,
}

impl OutputBudget {
    fn new(limits: &Limits) -> Self {
        OutputBudget {
            bytes_left: limits.max_output_bytes_per_call,
            lines_left: limits.max_log_lines_per_call,
            dropped_bytes: 0,
            dropped_lines: 0,
            stdout_line: Vec::new(),
            stderr_line: Vec::new(),
            stderr_tail: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

fn emit_output(label: &str, index: u64, stream: Stream, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    if text.is_empty() {
        return;
    }
    match stream {
        Stream::Stdout => {
            tracing::info!(target: "waft::guest", service = %label, index, "stdout: {text}")
        }
        Stream::Stderr => {
            tracing::warn!(target: "waft::guest", service = %label, index, "stderr: {text}")
        }
    }
}

impl CallState {
    fn write(&self, stream: Stream, bytes: &[u8]) {
        let index = self.index.load(Ordering::Relaxed);
        let mut out = lock_anyway(&self.output);
        if stream == Stream::Stderr {
            out.stderr_tail.extend_from_slice(bytes);
            let excess = out.stderr_tail.len().saturating_sub(STDERR_TAIL);
            out.stderr_tail.drain(..excess);
        }
        let take = bytes.len().min(out.bytes_left);
        out.bytes_left -= take;
        out.dropped_bytes += bytes.len() - take;
        let line_buf = match stream {
            Stream::Stdout => &mut out.stdout_line,
            Stream::Stderr => &mut out.stderr_line,
        };
        line_buf.extend_from_slice(&bytes[..take]);
        while let Some(pos) = line_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = line_buf.drain(..=pos).collect();
            emit_output(&self.label, index, stream, &line);
        }
    }

    pub(super) fn log(&self, level: Level, message: &str) {
        let index = self.index.load(Ordering::Relaxed);
        {
            let mut out = lock_anyway(&self.output);
            if out.lines_left == 0 {
                out.dropped_lines += 1;
                return;
            }
            out.lines_left -= 1;
        }
        const MAX_LINE: usize = 4096;
        let message = match message.char_indices().nth(MAX_LINE) {
            Some((cut, _)) => &message[..cut],
            None => message,
        };
        let label = &*self.label;
        match level {
            Level::Trace => {
                tracing::trace!(target: "waft::guest", service = %label, index, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "waft::guest", service = %label, index, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "waft::guest", service = %label, index, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "waft::guest", service = %label, index, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "waft::guest", service = %label, index, "{message}")
            }
        }
    }
}

impl super::bindings::v1::waft::fsm::types::Host for HostState {}

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.call.log(level, &message);
    }
}

impl v2::types::Host for HostState {}

impl v2::host::Host for HostState {
    fn log(&mut self, level: v2::host::Level, message: String) {
        use Level as L1;
        use v2::host::Level as L2;
        let level = match level {
            L2::Trace => L1::Trace,
            L2::Debug => L1::Debug,
            L2::Info => L1::Info,
            L2::Warn => L1::Warn,
            L2::Error => L1::Error,
        };
        self.call.log(level, &message);
    }
}

/// Adds what either version of the contract imports to `linker`: logging and the types on the
/// store's data, 0.2.0's timers and events on its effect log (`effects.rs`).
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    v1::Guest::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    v2::types::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    v2::host::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    v2::timers::add_to_linker::<HostState, HasSelf<EffectLog>>(linker, |s| &mut s.effects)?;
    v2::events::add_to_linker::<HostState, HasSelf<EffectLog>>(linker, |s| &mut s.effects)?;
    Ok(())
}

/// Wall and monotonic clock that read the timestamp of the entry being applied.
///
/// While an instance is being opened (its start-up code and its first call) the monotonic
/// clock reads 0: a runtime that takes its time origin then (JavaScript's `performance.now()`
/// counts from it) gets the same origin whenever the instance was opened, so what it measures
/// later does not depend on the instance's history.
struct DeterministicClock(Arc<CallState>);

impl HostWallClock for DeterministicClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.timestamp_ms.load(Ordering::Relaxed))
    }
}

impl HostMonotonicClock for DeterministicClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        if self.0.opening.load(Ordering::Relaxed) {
            return 0;
        }
        self.0
            .timestamp_ms
            .load(Ordering::Relaxed)
            .saturating_mul(1_000_000)
    }
}

/// A handle to the per-call ChaCha20 stream, reseeded by [`CallState::begin`].
struct SharedRng {
    call: Arc<CallState>,
    insecure: bool,
}

impl SharedRng {
    fn with<R>(&mut self, f: impl FnOnce(&mut ChaCha20Rng) -> R) -> R {
        let rng = if self.insecure {
            &self.call.insecure_rng
        } else {
            &self.call.rng
        };
        f(&mut lock_anyway(rng))
    }
}

impl TryRng for SharedRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.with(|r| r.try_next_u32())
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.with(|r| r.try_next_u64())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.with(|r| r.try_fill_bytes(dst))
    }
}

/// stdout or stderr of a guest: forwarded line by line to tracing within the per-call budget.
/// Writes never fail (a failing stdout would make Rust's `println!` panic, turning chatter into
/// a trap); what is over the budget is counted and dropped.
#[derive(Clone)]
struct GuestOutput {
    call: Arc<CallState>,
    stream: Stream,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.call.write(self.stream, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.call.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Caps memory and table growth, and remembers that a cap was hit so that the resulting trap
/// (usually an allocation failure turned into `unreachable`) is reported as "out of memory".
pub struct Limiter {
    max_memory: usize,
    max_table: usize,
    pub(super) hit: Option<String>,
    /// Linear memory the instance holds: every growth this limiter allowed (wasmtime asks it
    /// for a memory's initial size too), less the ones that failed.
    pub(super) memory_bytes: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.hit = Some(format!(
                "memory growth from {current} to {desired} bytes refused (limit {} bytes)",
                self.max_memory
            ));
            return Ok(false);
        }
        self.memory_bytes += desired.saturating_sub(current);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // The growth counted above did not happen; which memory it was, wasmtime does not
        // say. The count is an observation (metrics, budgets), so it stays as counted: a
        // guest that hits this traps and its instance is rebuilt anyway.
        tracing::debug!(error = %error, "a guest's memory growth failed");
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_table {
            self.hit = Some(format!(
                "table growth from {current} to {desired} elements refused (limit {})",
                self.max_table
            ));
            return Ok(false);
        }
        Ok(true)
    }
}
