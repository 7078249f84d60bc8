//! The errors a client call ends with: each names its cause, and none is a hang (every call
//! has a deadline).

use tonic::Code;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client's own settings are unusable (a malformed endpoint, unreadable TLS files, a
    /// token that is not printable ASCII).
    #[error("client settings: {0}")]
    Config(String),
    /// No node could be reached: nothing listens there, or the connection failed (a TLS
    /// handshake that failed, e.g. a TLS client and a plain-text node or the reverse, ends
    /// here too, with the handshake's words in `cause`).
    #[error("cannot reach a waft node at {endpoint}: {cause}")]
    Unreachable {
        /// The last endpoint tried.
        endpoint: String,
        /// The transport's words.
        cause: String,
    },
    /// The node wants a token (or a different one).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token is valid but may not make this call (an admin call with a client token).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request is malformed (an unknown service, an empty command, a bad module).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// What the call names does not exist (a service, a version).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is over a limit (a command or batch too large, too many in flight).
    #[error("too large: {0}")]
    TooLarge(String),
    /// What was asked for is out of what the node keeps (a watch from an index whose events
    /// are no longer kept: read the state with a query, then watch on).
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// The cluster is in no state to do it now (e.g. a watch from an index no node keeps).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// No leader answered in time, after every retry. For a submit, its outcome is unknown;
    /// submitting it again with the same client session applies it at most once.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The call's deadline passed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Anything else the node answered.
    #[error("{message} ({code:?})")]
    Server {
        /// The gRPC status code.
        code: Code,
        /// The node's words.
        message: String,
    },
}

impl Error {
    /// Whether the call may succeed if made again (on another node, a moment later).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            // A node that does not speak this client's protocol (TLS on one side only) will not
            // later either.
            Error::Unreachable { cause, .. } => !is_mismatch(cause),
            _ => false,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Error {
        let message = with_sources(&s);
        match s.code() {
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::NotFound => Error::NotFound(message),
            Code::ResourceExhausted => Error::TooLarge(message),
            // gRPC's own "message too large" is OUT_OF_RANGE too.
            Code::OutOfRange if message.contains("too large") => Error::TooLarge(message),
            Code::OutOfRange => Error::OutOfRange(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::Unavailable => Error::Unavailable(message),
            Code::DeadlineExceeded => Error::Timeout(message),
            code => Error::Server { code, message },
        }
    }
}

/// A status's message followed by its causes (a transport error hides the real one).
fn with_sources(s: &tonic::Status) -> String {
    append_sources(s.message().to_owned(), std::error::Error::source(s))
}

/// The whole chain of an error's causes, in words.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    append_sources(e.to_string(), e.source())
}

/// `out` followed by each cause from `next` on that it does not already say.
fn append_sources(mut out: String, mut next: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(e) = next {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}

/// Whether a connection failure's words say the two sides speak differently (TLS on one side
/// only, a certificate not trusted) rather than that nothing answered.
pub(crate) fn is_mismatch(cause: &str) -> bool {
    let c = cause.to_ascii_lowercase();
    [
        "h2 protocol error",
        "frame with invalid size",
        "invalidcontenttype",
        "corrupt message",
        "certificate",
        "handshake",
        "tls",
    ]
    .iter()
    .any(|w| c.contains(w))
}
