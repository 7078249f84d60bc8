//! The WASI functions that could wait, replaced by ones that never do.
//!
//! wasmtime-wasi's synchronous bindings implement every call that may wait (a stream's
//! `blocking-flush`, `blocking-write-and-flush`, `blocking-read`, dropping a stream, `poll`,
//! a pollable's `block`, creating a UDP socket) by running a future on the ambient tokio
//! runtime with `Handle::block_on`. On a thread of waft's async runtime that panics ("Cannot
//! start a runtime from within a runtime"), and a guest clock subscription (`sleep`) holds
//! the calling thread for as long as the guest asks, in real time.
//!
//! Nothing a guest can wait for in waft's WASI is external: its output streams accept every
//! write at once, its stdin is closed, its clocks stand still at the entry's timestamp, and
//! its sockets refuse. So the functions here drive those futures without any runtime: each is
//! polled once, and is always ready. One that is not (which only a host change could bring)
//! traps the call, the same way on every replica and on every thread, instead of waiting.
//! A clock subscription is ready at once: the guest's clock does not move during a call, so
//! a sleep ends at once and a loop waiting for time to pass runs until its fuel is spent.
//!
//! Architecture invariant: a guest call never waits and never enters the async runtime, so
//! it behaves the same on any thread (an async worker included); `tests/all/sandbox.rs` and
//! `tests/all/chaos/hostile.rs` check it on a worker.

use std::future::Future;
use std::task::{Context, Poll, Waker};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::clocks::{WasiClocksCtxView, WasiClocksView};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::bindings::io::poll as async_poll;
use wasmtime_wasi::p2::bindings::io::streams::{
    Host as AsyncStreams, HostInputStream as AsyncIn, HostOutputStream as AsyncOut,
};
use wasmtime_wasi::p2::bindings::sockets::network;
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::bindings::sync::sockets::udp_create_socket;
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, DynPollable, Pollable, SocketResult, StreamError,
    StreamResult, UdpSocket, subscribe,
};
use wasmtime_wasi::sockets::{WasiSocketsCtxView, WasiSocketsView};

/// Links the non-waiting versions of the functions above over those `add_to_linker_sync`
/// linked (which must come first).
pub(super) fn link<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    poll::add_to_linker::<T, IoData>(linker, |t| Io(t.ctx().table))?;
    streams::add_to_linker::<T, IoData>(linker, |t| Io(t.ctx().table))?;
    monotonic_clock::add_to_linker::<T, ClockData>(linker, |t| Clock(t.clocks()))?;
    udp_create_socket::add_to_linker::<T, SocketsData>(linker, |t| Sockets(t.sockets()))?;
    linker.allow_shadowing(false);
    Ok(())
}

/// What a call that would have to wait is told (it traps).
const WOULD_WAIT: &str = "the guest waited for something that never happens in waft's WASI \
                          (its streams, clocks and stdin never make a call wait)";

/// Polls `future` once, without a runtime: `None` when it is not ready.
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// `ready_now` for a call that traps when it would wait.
fn at_once<T>(future: impl Future<Output = wasmtime::Result<T>>) -> wasmtime::Result<T> {
    ready_now(future).unwrap_or_else(|| Err(wasmtime::format_err!("{WOULD_WAIT}")))
}

/// `at_once` for a stream call.
fn stream_at_once<T>(future: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
    ready_now(future).unwrap_or_else(|| Err(StreamError::trap(WOULD_WAIT)))
}

/// The guest's resource table, seen by the replaced `wasi:io` functions.
struct Io<'a>(&'a mut ResourceTable);

/// The `HasData` of [`Io`].
struct IoData;

impl HasData for IoData {
    type Data<'a> = Io<'a>;
}

impl poll::Host for Io<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        at_once(async_poll::Host::poll(self.0, pollables))
    }
}

impl poll::HostPollable for Io<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        at_once(async_poll::HostPollable::ready(self.0, pollable))
    }
    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        at_once(async_poll::HostPollable::block(self.0, pollable))
    }
    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}

impl streams::Host for Io<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        AsyncStreams::convert_stream_error(self.0, err).map(Into::into)
    }
}

impl streams::HostOutputStream for Io<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        at_once(AsyncOut::drop(self.0, stream))
    }
    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        AsyncOut::check_write(self.0, stream)
    }
    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        AsyncOut::write(self.0, stream, bytes)
    }
    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        stream_at_once(AsyncOut::blocking_write_and_flush(self.0, stream, bytes))
    }
    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        stream_at_once(AsyncOut::blocking_write_zeroes_and_flush(
            self.0, stream, len,
        ))
    }
    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncOut::subscribe(self.0, stream)
    }
    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        AsyncOut::write_zeroes(self.0, stream, len)
    }
    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        AsyncOut::flush(self.0, stream)
    }
    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        stream_at_once(AsyncOut::blocking_flush(self.0, stream))
    }
    fn splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        AsyncOut::splice(self.0, dst, src, len)
    }
    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        stream_at_once(AsyncOut::blocking_splice(self.0, dst, src, len))
    }
}

impl streams::HostInputStream for Io<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        at_once(AsyncIn::drop(self.0, stream))
    }
    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        AsyncIn::read(self.0, stream, len)
    }
    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        stream_at_once(AsyncIn::blocking_read(self.0, stream, len))
    }
    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        AsyncIn::skip(self.0, stream, len)
    }
    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        stream_at_once(AsyncIn::blocking_skip(self.0, stream, len))
    }
    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncIn::subscribe(self.0, stream)
    }
}

/// The guest's sockets, seen by the replaced `wasi:sockets/udp-create-socket` function.
struct Sockets<'a>(WasiSocketsCtxView<'a>);

/// The `HasData` of [`Sockets`].
struct SocketsData;

impl HasData for SocketsData {
    type Data<'a> = Sockets<'a>;
}

impl network::Host for Sockets<'_> {
    fn convert_error_code(
        &mut self,
        error: wasmtime_wasi::p2::SocketError,
    ) -> wasmtime::Result<network::ErrorCode> {
        network::Host::convert_error_code(&mut self.0, error)
    }
    fn network_error_code(
        &mut self,
        err: Resource<network::Error>,
    ) -> wasmtime::Result<Option<network::ErrorCode>> {
        network::Host::network_error_code(&mut self.0, err)
    }
}

impl network::HostNetwork for Sockets<'_> {
    fn drop(&mut self, this: Resource<network::Network>) -> wasmtime::Result<()> {
        network::HostNetwork::drop(&mut self.0, this)
    }
}

impl udp_create_socket::Host for Sockets<'_> {
    /// Refused, as every socket is in waft (wasmtime-wasi refuses it too, but through the
    /// async runtime).
    fn create_udp_socket(
        &mut self,
        _family: udp_create_socket::IpAddressFamily,
    ) -> SocketResult<Resource<UdpSocket>> {
        Err(network::ErrorCode::AccessDenied.into())
    }
}

/// The guest's clocks, seen by the replaced `wasi:clocks/monotonic-clock` functions.
struct Clock<'a>(WasiClocksCtxView<'a>);

/// The `HasData` of [`Clock`].
struct ClockData;

impl HasData for ClockData {
    type Data<'a> = Clock<'a>;
}

/// A clock subscription: the guest's clock stands still during a call, so any wait for it
/// is over at once.
struct Elapsed;

#[wasmtime_wasi::async_trait]
impl Pollable for Elapsed {
    async fn ready(&mut self) {}
}

impl Clock<'_> {
    fn elapsed(&mut self) -> wasmtime::Result<Resource<DynPollable>> {
        let deadline = self.0.table.push(Elapsed)?;
        subscribe(self.0.table, deadline)
    }
}

impl monotonic_clock::Host for Clock<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        monotonic_clock::Host::now(&mut self.0)
    }
    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        monotonic_clock::Host::resolution(&mut self.0)
    }
    fn subscribe_instant(
        &mut self,
        _when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.elapsed()
    }
    fn subscribe_duration(
        &mut self,
        _duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.elapsed()
    }
}
