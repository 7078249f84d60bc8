"""A Python client for waft: replicated state machines in WebAssembly, on Raft.

    from waft_client import Client

    with Client(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]) as waft:
        waft.deploy("kv", open("kv.wasm", "rb").read())
        print(waft.submit("kv", "put greeting hello"))        # Applied(index=.., outcome='ok', value=b'OK')
        print(waft.query("kv", "get greeting").value)         # b'hello'
        for event in waft.watch("kv", start_index=1):
            print(event.index, event.payload)

It finds and follows the leader, gives every call a deadline, retries on another node, and
submits commands exactly once (a client session with numbered commands). Errors are the
classes of `waft_client.errors`. The same features as the Rust crate `waft-client`
(docs/clients.md).
"""

from .client import Answer, Applied, Client, Deployed, Event
from .errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ServerError,
    Timeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
    Unreachable,
    WaftError,
)

__all__ = [
    "Answer",
    "Applied",
    "Client",
    "ConfigError",
    "Deployed",
    "Event",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ServerError",
    "Timeout",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "Unreachable",
    "WaftError",
]
