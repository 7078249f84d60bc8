"""The gRPC stubs of waft's API (proto/api.proto), generated with grpcio-tools.

An installed package carries them (generated when it was built). Used from a source checkout
instead, they are generated on first use into a cache directory (WAFT_PY_STUBS, or
~/.cache/waft-client/<hash of the proto>), so they always match the proto they came from.
"""

import hashlib
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def find_proto():
    """proto/ of the repository this package sits in (or WAFT_PROTO)."""
    for candidate in (os.environ.get("WAFT_PROTO"), os.path.join(HERE, "..", "..", "..", "proto")):
        if candidate and os.path.exists(os.path.join(candidate, "api.proto")):
            return os.path.abspath(candidate)
    raise RuntimeError("waft-client: cannot find proto/api.proto (set WAFT_PROTO to waft's proto/ directory)")


def generate(proto_dir, out_dir):
    """Writes api_pb2.py and api_pb2_grpc.py for proto_dir/api.proto into out_dir, the latter
    importing the former relatively (so they live inside a package)."""
    from grpc_tools import protoc

    os.makedirs(out_dir, exist_ok=True)
    code = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(proto_dir, "api.proto"),
        ]
    )
    if code != 0:
        raise RuntimeError(f"waft-client: generating stubs from {proto_dir} failed")
    grpc_file = os.path.join(out_dir, "api_pb2_grpc.py")
    with open(grpc_file) as f:
        text = f.read()
    text = text.replace("import api_pb2 as api__pb2", "from . import api_pb2 as api__pb2")
    with open(grpc_file, "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "__init__.py"), "a"):
        pass


def load():
    """(api_pb2, api_pb2_grpc): the package's own, else generated from the checkout's proto."""
    if os.path.exists(os.path.join(HERE, "api_pb2_grpc.py")):
        return importlib.import_module("waft_client.api_pb2"), importlib.import_module("waft_client.api_pb2_grpc")
    proto = find_proto()
    with open(os.path.join(proto, "api.proto"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.environ.get("WAFT_PY_STUBS") or os.path.join(os.path.expanduser("~"), ".cache", "waft-client")
    out = os.path.join(cache, digest, "waft_api_stubs")
    if not os.path.exists(os.path.join(out, "api_pb2_grpc.py")):
        generate(proto, out)
    parent = os.path.dirname(out)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    return importlib.import_module("waft_api_stubs.api_pb2"), importlib.import_module("waft_api_stubs.api_pb2_grpc")
