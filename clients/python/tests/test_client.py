"""The client scenario (the same as the Rust crate's, tests/all/rust_client.rs) and the bad
input it must name, against real `waft node` processes."""

import socket
import subprocess
import threading

import pytest

from conftest import Cluster
from waft_client import (
    Client,
    ConfigError,
    NotFound,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
    Unreachable,
)


def leader_of(client):
    status = client.status()
    assert status.leader_id, status
    return status.leader_id - 1


def test_follows_the_leader_across_its_death_applies_once_and_resumes_its_watch(cluster, kv):
    probe = Client(cluster.addrs[0], follow_leader=False)
    leader = leader_of(probe)
    probe.close()
    follower = (leader + 1) % 3
    client = Client([cluster.addrs[follower], cluster.addrs[leader], cluster.addrs[(leader + 2) % 3]])
    assert client.current_endpoint == cluster.addrs[leader], "found the leader through a follower"

    deployed = client.deploy("kv", kv)
    assert deployed.version == 1 and not deployed.unchanged
    assert client.deploy("kv", kv).unchanged

    watch = client.watch("kv", start_index=1)
    first = client.submit("kv", "put a 1")
    assert first.ok and first.value == b"OK"
    seen = []
    while not seen or seen[-1][0] < first.index:
        e = next(watch)
        seen.append((e.index, e.payload))

    cluster.kill(leader)  # SIGKILL: no goodbye
    second = client.submit("kv", "put b 2")
    assert second.ok and second.index > first.index
    assert client.current_endpoint != cluster.addrs[leader]

    for consistency in ("linearizable", "lease"):
        answer = client.query("kv", "get b", consistency)
        assert answer.value == b"2", consistency
        assert answer.applied_index >= second.index
    # Stale: the node's own copy; it is the leader, which has applied both writes.
    assert client.query("kv", "get a", "stale").value == b"1"

    batch = client.submit_batch("kv", [f"put k{i} {i}" for i in range(50)])
    assert all(r.ok for r in batch), batch
    many = client.submit_many("kv", [f"put m{i} {i}" for i in range(300)], batch=25, in_flight=4)
    assert len(many) == 300 and all(r.ok for r in many)
    refused = client.submit("kv", "frobnicate")
    assert refused.outcome == "rejected"

    # The watch broke with the leader and resumed elsewhere: every command once, in order.
    while seen[-1][0] < refused.index:
        e = next(watch)
        seen.append((e.index, e.payload))
    indexes = [i for i, _ in seen]
    assert indexes == sorted(set(indexes)), "in order, once each"
    payloads = [p for _, p in seen]
    for put in (b"put a 1", b"put b 2", b"put k49 49", b"put m299 299"):
        assert payloads.count(put) == 1, put

    # Concurrent submits from threads: each its own client session, each applied once.
    results = []

    def submitter(t):
        for i in range(20):
            results.append(client.submit("kv", f"put t{t}-{i} {i}"))

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 80 and all(r.ok for r in results)
    assert len({r.index for r in results}) == 80
    client.close()


def dead_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_names_what_is_wrong(kv, tmp_path):
    dead = dead_address()
    with pytest.raises(Unreachable) as e:
        Client(dead, attempts=2, connect_timeout=1.0)
    assert e.value.endpoint == dead
    with pytest.raises(ConfigError):
        Client([])
    with pytest.raises(ConfigError):
        Client(dead, tls_ca=str(tmp_path / "no-such-ca.pem"))

    secured = Cluster(node_args=["--token", "cluster-token-1", "--client-token", "client-token-2"], cli_args=["--token", "cluster-token-1"])
    try:
        addr = secured.addrs[0]
        for token in (None, "wrong"):
            # The node is reachable; the call says what it needs.
            c = Client(addr, token=token)
            with pytest.raises(Unauthenticated):
                c.submit("kv", "put a 1")
            with pytest.raises(Unauthenticated):
                c.deploy("kv", kv)
        client = Client(addr, token="client-token-2")
        with pytest.raises(PermissionDenied):
            client.deploy("kv", kv)
        Client(addr, token="cluster-token-1").deploy("kv", kv)
        with pytest.raises(TooLarge):
            client.submit("kv", b"x" * (5 << 20))
        with pytest.raises(NotFound):
            client.submit("nope", "put a 1")
        # TLS on the client only: the plain-text node is unreachable over TLS.
        # A CA of its own (made by `waft certs`, no other tool needed).
        subprocess.run([secured.bin, "certs", "--dir", str(tmp_path), "--name", "someone"], check=True, capture_output=True)
        ca = tmp_path / "ca.pem"
        with pytest.raises(Unreachable) as e:
            Client(addr, tls_ca=str(ca), attempts=1, connect_timeout=2.0)
        assert "TLS" in e.value.cause
    finally:
        secured.stop()


