"""A small Python client for waft, on stubs generated from proto/ with grpcio-tools.

    pip install grpcio==1.85.1 grpcio-tools==1.85.1
    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 status
    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 deploy kv kv.wasm
    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 submit kv 'put a 1'
    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 query kv 'get a'
    python3 examples/clients/python/waft_client.py --to-leader submit-lines kv commands.txt
    python3 examples/clients/python/waft_client.py watch kv --from 1 --count 10

The stubs are generated on first use into a cache directory next to this file (or run
`python3 -m grpc_tools.protoc -I proto --python_out=OUT --grpc_python_out=OUT proto/api.proto`
yourself). Commands are submitted exactly once: the client picks a random id and numbers its
commands, and retries a command with the same number after a retryable error (UNAVAILABLE:
an election, a node going away), so a retry never applies twice. `submit_many` sends many
commands pipelined over one Session stream (in order, one result each). With `to_leader`, the client asks
the node it was given for the leader and talks to the leader directly, so nothing is forwarded
(it asks again after an error).

Secured clusters: `--tls-ca FILE` (or WAFT_TLS_CA) connects over TLS trusting that CA, and
`--token` (or WAFT_TOKEN) sends `authorization: Bearer TOKEN` with every call, like the waft CLI.
"""

import argparse
import importlib
import os
import random
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "..", "..", "..", "proto")
GENERATED = os.environ.get("WAFT_PY_STUBS") or os.path.join(HERE, ".generated")


def stubs():
    """Imports (generating first if needed) the api_pb2 and api_pb2_grpc modules."""
    generated = os.path.join(GENERATED, "api_pb2_grpc.py")
    proto = os.path.join(PROTO, "api.proto")
    stale = not os.path.exists(generated) or (
        os.path.exists(proto) and os.path.getmtime(proto) > os.path.getmtime(generated)
    )
    if stale:
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

    def __init__(self, endpoint, timeout=10.0, retries=20, to_leader=False, tls_ca=None, token=None):
        import grpc

        self.grpc = grpc
        self.credentials = None
        if tls_ca:
            with open(tls_ca, "rb") as f:
                self.credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.pb, self.rpc = stubs()
        self.endpoint = endpoint
        self.to_leader = to_leader
        self.timeout = timeout
        self.retries = retries
        self.client_id = random.getrandbits(63) | 1
        self.sequence = 0
        # submit_many's lanes: [client id, last sequence] each.
        self.lanes = []
        self._connect(endpoint)
        if to_leader:
            self._find_leader()

    def _open(self, endpoint):
        if self.credentials is not None:
            return self.grpc.secure_channel(endpoint, self.credentials)
        return self.grpc.insecure_channel(endpoint)

    def _connect(self, endpoint):
        self.channel = self._open(endpoint)
        self.waft = self.rpc.WaftStub(self.channel)
        self.cluster = self.rpc.ClusterStub(self.channel)

    def _find_leader(self):
        """Talks to the leader from now on, if the given node knows one."""
        try:
            s = self.rpc.ClusterStub(self._open(self.endpoint)).Status(
                self.pb.StatusRequest(), timeout=self.timeout, metadata=self.metadata
            )
        except self.grpc.RpcError:
            return
        if s.HasField("leader_id") and s.leader_addr:
            self._connect(s.leader_addr)

    def _call(self, method_name, request, stub="waft"):
        for attempt in range(self.retries):
            try:
                return getattr(getattr(self, stub), method_name)(
                    request, timeout=self.timeout, metadata=self.metadata
                )
            except self.grpc.RpcError as e:
                if e.code() != self.grpc.StatusCode.UNAVAILABLE or attempt + 1 == self.retries:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0))
                if self.to_leader:
                    # The leader may have moved (or gone): ask the given node again.
                    self._find_leader()

    def submit(self, service, payload):
        """Applies a command exactly once; returns (outcome, value, log index)."""
        self.sequence += 1
        request = self.pb.SubmitRequest(
            service=service,
            payload=payload,
            client_id=self.client_id,
            sequence=self.sequence,
        )
        reply = self._call("Submit", request)
        outcome = reply.WhichOneof("outcome")
        return outcome, getattr(reply, outcome), reply.index

    def submit_many(self, service, payloads, batch=256, in_flight=8):
        """Applies many commands in order, exactly once each, pipelined over a Session stream.

        Batches of `batch` commands go out without waiting for the earlier ones' answers (at
        most `in_flight` unanswered). Each batch in flight is a lane of its own, a client id
        whose commands are numbered on, so a batch sent again after an unknown outcome (an
        election, a node going away) applies each of its commands at most once. Returns one
        (outcome, value, log index) per command; outcome is "ok", "rejected", "trapped" or
        "error" (a gRPC status the command got, e.g. NOT_FOUND)."""
        while len(self.lanes) < in_flight:
            self.lanes.append([random.getrandbits(63) | 1, 0])
        pending = {}
        for i, at in enumerate(range(0, len(payloads), batch)):
            lane = self.lanes[i % in_flight]
            commands = []
            for j, payload in enumerate(payloads[at : at + batch]):
                lane[1] += 1
                commands.append(
                    (j, self.pb.SubmitRequest(service=service, payload=payload, client_id=lane[0], sequence=lane[1]))
                )
            pending[i] = commands
        done = {}
        for attempt in range(self.retries):
            order = sorted(pending)
            # A retry sends one batch at a time, so a lane never has two batches in flight.
            window = threading.Semaphore(in_flight if attempt == 0 else 1)

            def requests():
                for i in order:
                    window.acquire()
                    yield self.pb.SessionRequest(commands=[c for _, c in pending[i]])

            last = attempt + 1 == self.retries
            try:
                replies = self.waft.Session(
                    requests(), timeout=self.timeout * (1 + len(order)), metadata=self.metadata
                )
                for i, reply in zip(order, replies):
                    window.release()
                    retry = []
                    for (j, command), result in zip(pending[i], reply.results):
                        if result.WhichOneof("result") == "reply":
                            r = result.reply
                            outcome = r.WhichOneof("outcome")
                            done[(i, j)] = (outcome, getattr(r, outcome), r.index)
                        elif result.failure.code == self.grpc.StatusCode.UNAVAILABLE.value[0] and not last:
                            retry.append((j, command))
                        else:
                            done[(i, j)] = ("error", result.failure.message, 0)
                    if retry:
                        pending[i] = retry
                    else:
                        del pending[i]
            except self.grpc.RpcError as e:
                # The stream broke: what it did not answer goes again.
                if e.code() != self.grpc.StatusCode.UNAVAILABLE or last:
                    raise
            if not pending:
                break
            time.sleep(min(0.05 * 2**attempt, 1.0))
            if self.to_leader:
                self._find_leader()
        return [done[k] for k in sorted(done)]

    def query(self, service, payload, consistency="LINEARIZABLE"):
        request = self.pb.QueryRequest(
            service=service,
            payload=payload,
            consistency=self.pb.Consistency.Value(consistency),
        )
        reply = self._call("Query", request)
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
        return self.waft.Deploy(chunks(), timeout=max(self.timeout, 300), metadata=self.metadata).version

    def status(self):
        return self._call("Status", self.pb.StatusRequest(), stub="cluster")

    def watch(self, service="", start_index=0):
        """Yields (index, service, payload, outcome, value) for what the node applies, in log
        order, from start_index (0: from now). After UNAVAILABLE (the node stopping, a broken
        connection) it reconnects and resumes from the next index; OUT_OF_RANGE (events no
        longer kept) is raised: read the state afresh, then watch again."""
        next_index = start_index
        failures = 0
        while True:
            request = self.pb.WatchRequest(service=service, start_index=next_index)
            try:
                for e in self.waft.Watch(request, metadata=self.metadata):
                    failures = 0
                    next_index = e.index + 1
                    outcome = e.WhichOneof("outcome")
                    yield e.index, e.service, e.payload, outcome, getattr(e, outcome)
                return
            except self.grpc.RpcError as err:
                if err.code() != self.grpc.StatusCode.UNAVAILABLE or failures + 1 >= self.retries:
                    raise
                failures += 1
                time.sleep(min(0.05 * 2**failures, 1.0))
                self._connect(self.endpoint)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="127.0.0.1:7001")
    parser.add_argument("--to-leader", action="store_true", help="talk to the leader directly")
    parser.add_argument("--tls-ca", default=os.environ.get("WAFT_TLS_CA"), help="connect over TLS, trusting this CA")
    parser.add_argument("--token", default=os.environ.get("WAFT_TOKEN"), help="bearer token sent with every call")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit")
    s.add_argument("service")
    s.add_argument("payload")
    sl = sub.add_parser("submit-lines", help="one command per line of FILE (- for stdin)")
    sl.add_argument("service")
    sl.add_argument("file")
    sl.add_argument("--batch", type=int, default=256, help="commands per request")
    q = sub.add_parser("query")
    q.add_argument("service")
    q.add_argument("payload")
    q.add_argument("--consistency", default="LINEARIZABLE", choices=["LINEARIZABLE", "LEASE", "STALE"])
    d = sub.add_parser("deploy")
    d.add_argument("service")
    d.add_argument("file")
    sub.add_parser("status")
    w = sub.add_parser("watch", help="print what the node applies, one line per event")
    w.add_argument("service", nargs="?", default="")
    w.add_argument("--from", dest="start", type=int, default=0, help="first log index (default: from now)")
    w.add_argument("--count", type=int, default=0, help="stop after this many events")
    args = parser.parse_args()

    import grpc

    client = Waft(args.endpoint, to_leader=args.to_leader, tls_ca=args.tls_ca, token=args.token)
    try:
        if args.command == "submit-lines":
            f = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
            with f:
                lines = [l.rstrip(b"\r\n") for l in f if l.strip()]
            failed = 0
            for outcome, value, index in client.submit_many(args.service, lines, batch=args.batch):
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                if outcome == "ok":
                    print(text)
                else:
                    failed += 1
                    print(f"{outcome}: {text} (index {index})")
            return 2 if failed else 0
        if args.command == "watch":
            seen = 0
            for index, service, payload, outcome, value in client.watch(args.service, args.start):
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                print(f"{index}\t{service}\t{payload.decode(errors='replace')}\t{outcome}: {text}", flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
            return 0
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
