//! The encoding of what storage writes (log entries, votes, snapshot headers, instance
//! histories): postcard, with errors that say what could not be read.

use std::io;

pub(crate) fn io_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Encodes a value stored in the log database.
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| io_err("cannot encode", e))
}

/// Decodes a value stored in the log database.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("corrupt {what}: {e}")))
}
