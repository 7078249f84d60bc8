"""`Client`: connections that find and follow the leader, and the calls of waft.v1 with
retries that never apply a command twice. The same features as the Rust crate `waft-client`."""

import random
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import grpc

from . import _stubs
from .errors import ConfigError, Unavailable, Unreachable, WaftError, from_rpc_error, from_status

pb, rpc = _stubs.load()

CHUNK = 1 << 20


class _Outcome:
    """`outcome` is "ok" (value: the reply bytes), "rejected" or "trapped" (value: the words)."""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class Applied(_Outcome):
    """A submitted command's result: its log index and what the guest did with it."""

    index: int
    outcome: str
    value: Union[bytes, str]


@dataclass(frozen=True)
class Answer(_Outcome):
    """A query's answer: the index the node had applied and the guest's outcome."""

    applied_index: int
    outcome: str
    value: Union[bytes, str]


@dataclass(frozen=True)
class Deployed:
    module_sha256: str
    index: int
    version: int
    unchanged: bool


@dataclass(frozen=True)
class Event:
    """What a watch reports: an applied command (outcome "reply", "rejected", "failed") or a
    version change (outcome "version")."""

    index: int
    service: str
    timestamp_ms: int
    payload: bytes
    outcome: str
    value: Union[bytes, str, int]


def _retryable(e: grpc.RpcError) -> bool:
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details = e.details() or ""
    return code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL) and (
        "transport" in details or "connection" in details.lower() or "Socket closed" in details
    )


class Client:
    """A client of a waft cluster. Give it any nodes' addresses (`host:port`).

    Every call has a deadline (`timeout` seconds); a call the cluster cannot take now (an
    election, a node going down) is made again on the next node that answers, 0.1 s later, then
    twice as long each time up to 2 s, `attempts` times in all. Commands carry an exactly-once
    client session: one made again after an unknown outcome is applied at most once. With
    `follow_leader` (the default) the client asks the node it reached for the leader and talks
    to the leader directly. Thread-safe."""

    def __init__(
        self,
        endpoints: Union[str, Sequence[str]],
        token: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        attempts: int = 10,
        follow_leader: bool = True,
    ):
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ConfigError("no endpoint given")
        self.credentials = None
        if tls_ca:
            try:
                with open(tls_ca, "rb") as f:
                    ca = f.read()
                cert = key = None
                if tls_cert or tls_key:
                    with open(tls_cert, "rb") as f:
                        cert = f.read()
                    with open(tls_key, "rb") as f:
                        key = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read TLS files: {e}") from e
            self.credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.attempts = max(1, attempts)
        self.follow_leader = follow_leader
        self._lock = threading.Lock()
        self._current = None  # (address, channel)
        self._lanes = []  # free client sessions: [id, next sequence]
        self._conn()

    # --- connections ---

    def _open(self, address):
        if self.credentials is not None:
            return grpc.secure_channel(address, self.credentials)
        return grpc.insecure_channel(address)

    def _reach(self, address):
        """A channel to `address` that answered a Status call, and the reply."""
        channel = self._open(address)
        try:
            status = rpc.ClusterStub(channel).Status(pb.StatusRequest(), timeout=self.connect_timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # No token or a wrong one: the node is there, and the call itself will say what
                # it needs (a deploy names the cluster token); stay on this node.
                return channel, pb.StatusReply()
            channel.close()
            cause = e.details() or e.code().name
            if self.credentials is not None and "refused" not in cause.lower():
                cause += " (does the node serve TLS, and did this CA sign its certificate?)"
            raise Unreachable(address, cause) from None
        return channel, status

    def _conn(self):
        """The channel calls go to: the current one, or the first endpoint that answers (then
        the leader it names, if that answers)."""
        with self._lock:
            if self._current is not None:
                return self._current[1]
            last = None
            for address in self.endpoints:
                try:
                    channel, status = self._reach(address)
                except Unreachable as e:
                    last = e
                    continue
                chosen = (address, channel)
                if self.follow_leader and status.leader_addr and status.leader_addr != address:
                    try:
                        leader, _ = self._reach(status.leader_addr)
                        channel.close()
                        chosen = (status.leader_addr, leader)
                    except Unreachable:
                        pass
                self._current = chosen
                return chosen[1]
            raise last

    def _reconnect(self):
        with self._lock:
            if self._current is not None:
                self._current[1].close()
            self._current = None

    @property
    def current_endpoint(self) -> Optional[str]:
        """The address calls go to now."""
        with self._lock:
            return self._current[0] if self._current else None

    def close(self):
        self._reconnect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _retrying(self, call):
        """Makes call(channel) until it succeeds, fails for good or the attempts run out."""
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            try:
                channel = self._conn()
                return call(channel)
            except Unreachable as e:
                failure = e
            except grpc.RpcError as e:
                if not _retryable(e):
                    raise from_rpc_error(e) from None
                failure = from_rpc_error(e)
            if attempt == self.attempts:
                raise failure
            self._reconnect()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _waft(self, channel):
        return rpc.WaftStub(channel)

    # --- client sessions ---

    def _take_lane(self):
        with self._lock:
            return self._lanes.pop() if self._lanes else [random.getrandbits(63) | 1, 1]

    def _put_lane(self, lane):
        with self._lock:
            self._lanes.append(lane)

    # --- calls ---

    def submit(self, service: str, payload: Union[bytes, str]) -> Applied:
        """Applies one command exactly once (made again, with the same client session and
        number, while its outcome is unknown)."""
        lane = self._take_lane()
        request = pb.SubmitRequest(service=service, payload=_bytes(payload), client_id=lane[0], sequence=lane[1])
        try:
            reply = self._retrying(lambda c: self._waft(c).Submit(request, timeout=self.timeout, metadata=self.metadata))
        finally:
            # Used up whether or not it applied: an unknown outcome may still apply it.
            lane[1] += 1
            self._put_lane(lane)
        return _applied(reply)

    def submit_batch(self, service: str, payloads: Iterable[Union[bytes, str]]) -> List[Union[Applied, WaftError]]:
        """Applies commands as one batch, in order, each exactly once: one result per command,
        an `Applied` or the error that command got."""
        lane = self._take_lane()
        commands = []
        for p in payloads:
            commands.append(pb.SubmitRequest(service=service, payload=_bytes(p), client_id=lane[0], sequence=lane[1]))
            lane[1] += 1

        def round_(cmds):
            reply = self._retrying(
                lambda c: self._waft(c).SubmitBatch(pb.SubmitBatchRequest(commands=cmds), timeout=self.timeout, metadata=self.metadata)
            )
            return list(reply.results)

        try:
            return self._until_answered(commands, round_)
        finally:
            # Given back only now: one batch in flight per client session.
            self._put_lane(lane)

    def _until_answered(self, commands, round_):
        answers = [None] * len(commands)
        todo = list(range(len(commands)))
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            try:
                results = [_from_result(r) for r in round_([commands[i] for i in todo])]
            except WaftError as e:
                if not e.retryable or last:
                    raise
                results = [e] * len(todo)
            again = []
            for i, r in zip(todo, results):
                if isinstance(r, WaftError) and r.retryable and not last:
                    again.append(i)
                else:
                    answers[i] = r
            if not again:
                break
            todo = again
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return [a if a is not None else Unavailable("no answer") for a in answers]

    def submit_many(self, service: str, payloads: Sequence[Union[bytes, str]], batch: int = 256, in_flight: int = 8) -> List[Union[Applied, WaftError]]:
        """Applies many commands in order, exactly once each, pipelined over one Session
        stream: batches of `batch` go out without waiting for the earlier ones' answers (at
        most `in_flight` unanswered), each batch in a client session of its own. One result per
        command: an `Applied` or the error that command got."""
        # Batch i goes in lane i % in_flight, numbered on: batch i + in_flight is sent only
        # once batch i is answered, so a lane never has two batches in flight.
        n = (len(payloads) + batch - 1) // batch
        lanes = [self._take_lane() for _ in range(min(in_flight, n))]
        batches = []
        for i, at in enumerate(range(0, len(payloads), batch)):
            lane = lanes[i % len(lanes)]
            cmds = []
            for p in payloads[at : at + batch]:
                cmds.append(pb.SubmitRequest(service=service, payload=_bytes(p), client_id=lane[0], sequence=lane[1]))
                lane[1] += 1
            batches.append((lane, cmds))
        pending = {i: list(enumerate(cmds)) for i, (_, cmds) in enumerate(batches)}
        done = {}
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            order = sorted(pending)
            # A retry sends one batch at a time.
            window = threading.Semaphore(in_flight if attempt == 1 else 1)

            def requests():
                for i in order:
                    window.acquire()
                    yield pb.SessionRequest(commands=[c for _, c in pending[i]])

            try:
                channel = self._conn()
                replies = self._waft(channel).Session(requests(), timeout=self.timeout * (1 + len(order)), metadata=self.metadata)
                for i, reply in zip(order, replies):
                    window.release()
                    retry = []
                    for (j, command), result in zip(pending[i], reply.results):
                        r = _from_result(result)
                        if isinstance(r, WaftError) and r.retryable and not last:
                            retry.append((j, command))
                        else:
                            done[(i, j)] = r
                    if retry:
                        pending[i] = retry
                    else:
                        del pending[i]
            except Unreachable:
                if last:
                    raise
            except grpc.RpcError as e:
                # The stream broke: what it did not answer goes again.
                if not _retryable(e) or last:
                    raise from_rpc_error(e) from None
            if not pending:
                break
            self._reconnect()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        for lane in lanes:
            self._put_lane(lane)
        out = []
        for i, (_, cmds) in enumerate(batches):
            for j in range(len(cmds)):
                out.append(done.get((i, j), Unavailable("no answer")))
        return out

    def query(self, service: str, payload: Union[bytes, str], consistency: str = "linearizable") -> Answer:
        """Asks `service` at `consistency`: "linearizable", "lease" or "stale"."""
        request = pb.QueryRequest(service=service, payload=_bytes(payload), consistency=pb.Consistency.Value(consistency.upper()))
        reply = self._retrying(lambda c: self._waft(c).Query(request, timeout=self.timeout, metadata=self.metadata))
        outcome = reply.WhichOneof("outcome")
        return Answer(reply.applied_index, outcome, getattr(reply, outcome))

    def deploy(self, service: str, module: bytes, deploy_timeout: float = 300.0, **header) -> Deployed:
        """Deploys the component `module` as `service`, streamed in 1 MiB chunks. Keyword
        arguments set DeployHeader fields (dry_run, fuel_per_apply, max_memory_bytes, force...).
        Needs the cluster token when the cluster has tokens."""
        head = pb.DeployHeader(service=service, size=len(module), **header)

        def chunks():
            yield pb.DeployChunk(header=head)
            for at in range(0, len(module), CHUNK):
                yield pb.DeployChunk(data=module[at : at + CHUNK])

        reply = self._retrying(lambda c: self._waft(c).Deploy(chunks(), timeout=deploy_timeout, metadata=self.metadata))
        return Deployed(reply.module_sha256, reply.index, reply.version, reply.unchanged)

    def services(self):
        reply = self._retrying(lambda c: self._waft(c).ListServices(pb.ListServicesRequest(), timeout=self.timeout, metadata=self.metadata))
        return list(reply.services)

    def status(self):
        """The contacted node's view of the cluster (a StatusReply)."""
        return self._retrying(lambda c: rpc.ClusterStub(c).Status(pb.StatusRequest(), timeout=self.timeout, metadata=self.metadata))

    def transfer_leader(self, to: int):
        """Asks the leader to hand leadership to node `to` (admin)."""
        self._retrying(lambda c: rpc.ClusterStub(c).TransferLeader(pb.TransferLeaderRequest(to=to), timeout=self.timeout, metadata=self.metadata))

    def watch(self, service: Optional[str] = None, start_index: Optional[int] = None) -> Iterator[Event]:
        """Yields the events of `service` (every service if None) in log order, from
        `start_index` (None: from now). When its node goes away it opens again on a node the
        client finds, from the index after the last event it yielded; OutOfRange if those
        events are no longer kept (read the state with a query, then watch again)."""
        next_index = start_index or 0
        failures = 0
        while True:
            request = pb.WatchRequest(service=service or "", start_index=next_index)
            try:
                channel = self._conn()
                for e in self._waft(channel).Watch(request, metadata=self.metadata):
                    failures = 0
                    next_index = e.index + 1
                    outcome = e.WhichOneof("outcome")
                    yield Event(e.index, e.service, e.timestamp_ms, e.payload, outcome, getattr(e, outcome))
                failure = Unavailable("the node ended the watch")
            except Unreachable as e:
                failure = e
            except grpc.RpcError as e:
                if not _retryable(e):
                    raise from_rpc_error(e) from None
                failure = from_rpc_error(e)
            failures += 1
            if failures >= self.attempts:
                raise failure
            self._reconnect()
            time.sleep(min(0.1 * 2**failures, 2.0))


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _bytes(payload):
    return payload.encode() if isinstance(payload, str) else bytes(payload)


def _applied(reply):
    outcome = reply.WhichOneof("outcome")
    if outcome is None:
        raise from_status("INTERNAL", "the node sent an empty reply")
    return Applied(reply.index, outcome, getattr(reply, outcome))


def _from_result(result):
    kind = result.WhichOneof("result")
    if kind == "reply":
        return _applied(result.reply)
    if kind == "failure":
        return from_status(_CODE_NAMES.get(result.failure.code, "UNKNOWN"), result.failure.message)
    return from_status("INTERNAL", "the node sent an empty result")
