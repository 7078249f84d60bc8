"""A Python guest that draws on every source of nondeterminism Python offers, with the waft_det
helper: `waft exec --verify` must find it deterministic, and replicas must agree.

Each command records what it observed (random, Random(), uuid4, secrets, os.urandom, hash(),
set iteration order, time.time(), time.monotonic()) in the state and in the reply.
"""

from waft_det import deterministic

import json
import os
import random
import secrets
import time
import uuid

from wit_world import exports
from componentize_py_types import Ok

STATE = []
KEPT = random.Random()  # made at import time, kept across calls


def observe(tag):
    return {
        "tag": tag,
        "random": random.getrandbits(64),
        "choice": random.choice("abcdefgh"),
        "random_instance": random.Random().getrandbits(64),
        "kept_instance": KEPT.getrandbits(32),
        "uuid4": str(uuid.uuid4()),
        "secrets": secrets.token_hex(8),
        "urandom": os.urandom(8).hex(),
        "hash": hash("waft"),
        "set": list({"alpha", "beta", "gamma", "delta", "epsilon"}),
        "dict": list({k: 1 for k in ("z", "y", "x")}),
        "time": time.time(),
        "monotonic": time.monotonic(),
    }


@deterministic
class StateMachine(exports.StateMachine):
    def apply(self, context, command):
        seen = observe(bytes(command).decode())
        STATE.append(seen)
        return json.dumps(seen, sort_keys=True).encode()

    def apply_batch(self, entries):
        return [Ok(self.apply(e.context, e.command)) for e in entries]

    def query(self, request):
        if bytes(request) == b"observe":
            return json.dumps(observe("query"), sort_keys=True).encode()
        return json.dumps(STATE, sort_keys=True).encode()

    def snapshot(self):
        return json.dumps(STATE, sort_keys=True).encode()

    def restore(self, snapshot):
        global STATE
        STATE = json.loads(bytes(snapshot)) if snapshot else []
