//! The connections a node's server has accepted, so that stopping the node closes them.
//!
//! tonic serves each connection on a task of its own, which outlives the server's task: after
//! the server stops (or is aborted when a peer's long-lived stream keeps it from stopping
//! gracefully), its connections would go on being served in a process that keeps running (an
//! embedding program, a node restarted in-process), and a peer's pooled connection would keep
//! talking to the stopped node instead of reconnecting to whatever listens on the address now.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The open connections of one server.
#[derive(Clone, Default)]
pub(super) struct Accepted(Arc<Mutex<HashSet<RawFd>>>);

impl Accepted {
    /// Tracks `stream` until it is dropped.
    pub(super) fn track(&self, stream: TcpStream) -> Tracked {
        let fd = stream.as_raw_fd();
        crate::sync::lock_anyway(&self.0).insert(fd);
        Tracked {
            inner: stream,
            fd,
            accepted: self.clone(),
        }
    }

    /// Shuts every open connection down (both ways): their tasks see the end and finish.
    pub(super) fn close_all(&self) {
        let open = crate::sync::lock_anyway(&self.0);
        for fd in open.iter() {
            // SAFETY: the descriptor is open: a connection leaves the set (under this lock)
            // before its socket is closed (see `Drop for Tracked`). shutdown(2) only ends the
            // connection; the descriptor stays its owner's to close.
            unsafe {
                libc::shutdown(*fd, libc::SHUT_RDWR);
            }
        }
    }
}

/// An accepted connection, known to its server's [`Accepted`] while it is open.
pub(super) struct Tracked {
    inner: TcpStream,
    fd: RawFd,
    accepted: Accepted,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Before `inner` closes the descriptor (fields drop after this body).
        crate::sync::lock_anyway(&self.accepted.0).remove(&self.fd);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Tracked {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
