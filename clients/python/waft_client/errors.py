"""The errors a call ends with: each names its cause; none is a hang (every call has a
deadline). They mirror the Rust crate's `waft_client::Error`."""


class WaftError(Exception):
    """Base of every waft client error. `code` is the gRPC status code name, when there is one."""

    code = None

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    retryable = False


class ConfigError(WaftError):
    """The client's own settings are unusable (no endpoint, unreadable TLS files)."""


class Unreachable(WaftError):
    """No node could be reached at `endpoint` (nothing listens, or the connection failed, e.g.
    TLS on one side only)."""

    retryable = True

    def __init__(self, endpoint, cause):
        super().__init__(f"cannot reach a waft node at {endpoint}: {cause}", "UNAVAILABLE")
        self.endpoint = endpoint
        self.cause = cause


class Unauthenticated(WaftError):
    """The node wants a token, or a different one."""


class PermissionDenied(WaftError):
    """The token may not make this call (an admin call with a client token)."""


class InvalidArgument(WaftError):
    """A malformed request (an empty command, a bad module)."""


class NotFound(WaftError):
    """What the call names does not exist (a service, a version)."""


class TooLarge(WaftError):
    """A command, batch or message over the node's limits."""


class OutOfRange(WaftError):
    """A watch from an index whose events the node no longer keeps."""


class FailedPrecondition(WaftError):
    """The cluster is in no state to do it now."""


class Unavailable(WaftError):
    """No leader answered after every attempt. A submit's outcome is unknown: submitting it
    again with the same client applies it at most once."""

    retryable = True


class Timeout(WaftError):
    """The call's deadline passed."""


class ServerError(WaftError):
    """Anything else the node answered."""


_BY_CODE = {
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "RESOURCE_EXHAUSTED": TooLarge,
    "FAILED_PRECONDITION": FailedPrecondition,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": Timeout,
}


def from_status(code_name, message):
    """The error for a gRPC status (code name, details)."""
    if code_name == "OUT_OF_RANGE":
        cls = TooLarge if "too large" in message else OutOfRange
    else:
        cls = _BY_CODE.get(code_name, ServerError)
    return cls(f"{message} ({code_name})", code_name)


def from_rpc_error(e):
    """The error for a grpc.RpcError."""
    return from_status(e.code().name, e.details() or "")
