"""A small Python client for waft, on stubs generated from proto/ with grpcio-tools.

    pip install grpcio==1.85.1 grpcio-tools==1.85.1
    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 status
    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 deploy kv kv.wasm
    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 submit kv 'put a 1'
    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 query kv 'get a'

The stubs are generated on first use into a cache directory next to this file (or run
`python3 -m grpc_tools.protoc -I proto --python_out=OUT --grpc_python_out=OUT proto/api.proto`
yourself). Commands are submitted exactly once: the client picks a random id and numbers its
commands, and retries a command with the same number after a retryable error (UNAVAILABLE:
an election, a node going away), so a retry never applies twice.
"""

import argparse
import importlib
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "..", "..", "..", "proto")
GENERATED = os.environ.get("WAFT_PY_STUBS") or os.path.join(HERE, ".generated")


def stubs():
    """Imports (generating first if needed) the api_pb2 and api_pb2_grpc modules."""
    if not os.path.exists(os.path.join(GENERATED, "api_pb2_grpc.py")):
        from grpc_tools import protoc

        os.makedirs(GENERATED, exist_ok=True)
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO}",
                f"--python_out={GENERATED}",
                f"--grpc_python_out={GENERATED}",
                os.path.join(PROTO, "api.proto"),
            ]
        )
        if code != 0:
            sys.exit(f"error: generating stubs from {PROTO} failed")
    sys.path.insert(0, GENERATED)
    return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")


class Waft:
    """One connection to a waft node (any node: followers forward to the leader)."""

    def __init__(self, endpoint, timeout=10.0, retries=20):
        import grpc

        self.grpc = grpc
        self.pb, rpc = stubs()
        self.channel = grpc.insecure_channel(endpoint)
        self.waft = rpc.WaftStub(self.channel)
        self.cluster = rpc.ClusterStub(self.channel)
        self.timeout = timeout
        self.retries = retries
        self.client_id = random.getrandbits(63) | 1
        self.sequence = 0

    def _call(self, method, request):
        for attempt in range(self.retries):
            try:
                return method(request, timeout=self.timeout)
            except self.grpc.RpcError as e:
                if e.code() != self.grpc.StatusCode.UNAVAILABLE or attempt + 1 == self.retries:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0))

    def submit(self, service, payload):
        """Applies a command exactly once; returns (outcome, value, log index)."""
        self.sequence += 1
        request = self.pb.SubmitRequest(
            service=service,
            payload=payload,
            client_id=self.client_id,
            sequence=self.sequence,
        )
        reply = self._call(self.waft.Submit, request)
        outcome = reply.WhichOneof("outcome")
        return outcome, getattr(reply, outcome), reply.index

    def query(self, service, payload, consistency="LINEARIZABLE"):
        request = self.pb.QueryRequest(
            service=service,
            payload=payload,
            consistency=self.pb.Consistency.Value(consistency),
        )
        reply = self._call(self.waft.Query, request)
        outcome = reply.WhichOneof("outcome")
        return outcome, getattr(reply, outcome), reply.applied_index

    def deploy(self, service, module):
        """Uploads a component (streamed in 1 MiB chunks); returns the new version."""
        header = self.pb.DeployHeader(service=service, size=len(module))

        def chunks():
            yield self.pb.DeployChunk(header=header)
            for at in range(0, len(module), 1 << 20):
                yield self.pb.DeployChunk(data=module[at : at + (1 << 20)])

        # A stream cannot be replayed by _call: a deploy is retried by calling deploy again.
        return self.waft.Deploy(chunks(), timeout=max(self.timeout, 300)).version

    def status(self):
        return self._call(self.cluster.Status, self.pb.StatusRequest())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="127.0.0.1:7001")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit")
    s.add_argument("service")
    s.add_argument("payload")
    q = sub.add_parser("query")
    q.add_argument("service")
    q.add_argument("payload")
    q.add_argument("--consistency", default="LINEARIZABLE", choices=["LINEARIZABLE", "LEASE", "STALE"])
    d = sub.add_parser("deploy")
    d.add_argument("service")
    d.add_argument("file")
    sub.add_parser("status")
    args = parser.parse_args()

    import grpc

    client = Waft(args.endpoint)
    try:
        if args.command == "submit":
            outcome, value, index = client.submit(args.service, args.payload.encode())
        elif args.command == "query":
            outcome, value, index = client.query(args.service, args.payload.encode(), args.consistency)
        elif args.command == "deploy":
            with open(args.file, "rb") as f:
                print(f"deployed {args.service} version {client.deploy(args.service, f.read())}")
            return 0
        else:
            s = client.status()
            print(f"node {s.node_id} is {s.role} in term {s.term}; leader {s.leader_id}; applied {s.applied_index}")
            return 0
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if outcome == "ok":
        print(text)
        return 0
    print(f"{outcome}: {text} (index {index})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
