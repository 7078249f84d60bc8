"""Real clusters for the client's tests: `waft node` processes on 127.0.0.1, formed with the
waft CLI. WAFT_BIN names the waft binary and WAFT_KV_WASM the kv example guest (the Rust test
suite sets both when it runs this suite); without them, the repository's build outputs are
used, and a missing one fails the tests (it never skips them)."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _first(paths, what):
    for p in paths:
        if p and os.path.exists(p):
            return p
    pytest.fail(f"{what} not found (tried {paths}): build waft first (cargo build), or set its variable")


def waft_bin():
    return _first(
        [os.environ.get("WAFT_BIN"), os.path.join(ROOT, "target", "debug", "waft"), os.path.join(ROOT, "target", "release", "waft")],
        "the waft binary (WAFT_BIN)",
    )


def kv_wasm():
    path = _first(
        [
            os.environ.get("WAFT_KV_WASM"),
            os.path.join(ROOT, "target", "guests", "wasm32-wasip2", "release", "kv.wasm"),
            os.path.join(ROOT, "examples", "guests", "target", "wasm32-wasip2", "release", "kv.wasm"),
        ],
        "the kv example guest (WAFT_KV_WASM)",
    )
    with open(path, "rb") as f:
        return f.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Three `waft node` processes, formed into a cluster."""

    def __init__(self, node_args=(), cli_args=()):
        self.bin = waft_bin()
        self.dir = tempfile.mkdtemp(prefix="waft-py-")
        self.node_args = list(node_args)
        self.cli_args = list(cli_args)
        self.addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        self.procs = [None, None, None]
        for i in range(3):
            self.start(i)
        self.cli("cluster", "init", endpoint=self.addrs[0])
        for i in (1, 2):
            self.cli("cluster", "add-learner", str(i + 1), self.addrs[i], endpoint=self.addrs[0])
        self.cli("cluster", "change-membership", "1", "2", "3", endpoint=self.addrs[0])

    def start(self, i):
        log = open(os.path.join(self.dir, f"n{i + 1}.log"), "ab")
        self.procs[i] = subprocess.Popen(
            [self.bin, "node", "--id", str(i + 1), "--listen", self.addrs[i], "--data-dir", os.path.join(self.dir, f"n{i + 1}")]
            + self.node_args,
            stdout=log,
            stderr=log,
        )
        deadline = time.time() + 30
        host, port = self.addrs[i].split(":")
        while time.time() < deadline:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"node {i + 1} did not listen on {self.addrs[i]}")

    def cli(self, *args, endpoint):
        out = subprocess.run([self.bin, "--endpoint", endpoint] + self.cli_args + list(args), capture_output=True, timeout=60)
        assert out.returncode == 0, out
        return out.stdout.decode()

    def kill(self, i):
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def stop(self):
        for p in self.procs:
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture
def kv():
    return kv_wasm()
