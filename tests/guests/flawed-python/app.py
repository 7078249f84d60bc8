"""A Python guest with the mistakes `waft exec --verify` must catch, one per command:

- `gen`:    a value from `random`'s own generator, seeded once per instance (no waft_det helper)
- `global`: a counter kept in a global that `snapshot` leaves out
- `map K`:  K put in a dict whose snapshot is written in insertion order, while `restore`
            rebuilds it sorted: its order (and the snapshot's bytes) depend on the history
- `keep X`: X kept in the state (a sorted list: deterministic), for contrast
Queries: `bump` changes the hidden counter (a query that mutates); anything else reads.

Without waft_det, replicas running this guest must still agree: every replica's instance goes
through the same calls.
"""

import json
import random

from wit_world import exports
from componentize_py_types import Err, Ok

KEPT = []
MAP = {}
HIDDEN = {"count": 0}


class StateMachine(exports.StateMachine):
    def apply(self, context, command):
        text = bytes(command).decode()
        if text == "gen":
            return str(random.getrandbits(64)).encode()
        if text == "global":
            HIDDEN["count"] += 1
            return str(HIDDEN["count"]).encode()
        if text.startswith("map "):
            MAP[text[4:]] = context.index
            return ",".join(MAP).encode()
        if text.startswith("keep "):
            KEPT.append(text[5:])
            KEPT.sort()
            return b"kept"
        raise Err(f"unknown command {text!r}")

    def apply_batch(self, entries):
        out = []
        for e in entries:
            try:
                out.append(Ok(self.apply(e.context, e.command)))
            except Err as err:
                out.append(err)
        return out

    def query(self, request):
        if bytes(request) == b"bump":
            HIDDEN["count"] += 1
        return json.dumps({"kept": KEPT, "count": HIDDEN["count"]}).encode()

    def snapshot(self):
        return json.dumps({"kept": KEPT, "map": MAP}).encode()

    def restore(self, snapshot):
        global KEPT, MAP
        state = json.loads(bytes(snapshot)) if snapshot else {"kept": [], "map": {}}
        KEPT = state["kept"]
        MAP = dict(sorted(state["map"].items()))
