"""A Python guest that misbehaves on command, to test that waft contains it (issue 36).

State: a dict of names to values, changed by `set NAME VALUE`, read by the query `get NAME`.
Misbehaviour, as commands and (but `set`) as queries:
- `print`:        prints a line to stdout (buffered)
- `print-flush`:  prints a line to stdout and one to stderr, each flushed at once
- `print-mb N`:   prints N MiB to stdout, flushed
- `raise`:        raises an uncaught exception (its traceback goes to stderr)
- `raise-after-set NAME VALUE`: changes the state, then raises
- `sleep S`:      sleeps S seconds (waft's clock stands still: returns at once)
- `stdin`:        reads stdin (always empty in waft)
- `loop`:         loops until its fuel runs out
- `bomb`:         allocates until its memory runs out
- `recurse`:      recurses until Python's recursion limit
- `huge N`:       replies with N bytes
The same exports raise on `snapshot` when the state holds `raise-on-snapshot`. `snapshot` and
`restore` (so every snapshot, rebase and restore) print a flushed line to stdout and stderr.
"""

import json
import sys
import time

from wit_world import exports
from componentize_py_types import Err, Ok

STATE = {}


def misbehave(text):
    """Runs a misbehaviour; returns its reply, or None when `text` names none."""
    words = text.split()
    if words == ["print"]:
        print("hello from a guest")
        return b"printed"
    if words == ["print-flush"]:
        print("hello", flush=True)
        print("hello on stderr", file=sys.stderr, flush=True)
        return b"printed"
    if len(words) == 2 and words[0] == "print-mb":
        line = "x" * 1023
        for _ in range(int(words[1]) * 1024):
            print(line, flush=True)
        return b"printed"
    if words == ["raise"]:
        raise ValueError("deliberate uncaught exception")
    if len(words) == 2 and words[0] == "sleep":
        time.sleep(float(words[1]))
        return b"slept"
    if words == ["stdin"]:
        return ("read %d bytes" % len(sys.stdin.read())).encode()
    if words == ["loop"]:
        n = 0
        while True:
            n += 1
    if words == ["bomb"]:
        hoard = []
        while True:
            hoard.append(bytearray(4 << 20))
    if words == ["recurse"]:
        def down(n):
            return down(n + 1) + 1
        return str(down(0)).encode()
    if len(words) == 2 and words[0] == "huge":
        return b"x" * int(words[1])
    return None


class StateMachine(exports.StateMachine):
    def apply(self, context, command):
        text = bytes(command).decode(errors="replace")
        words = text.split()
        if len(words) == 3 and words[0] == "set":
            STATE[words[1]] = words[2]
            return b"OK"
        if len(words) == 3 and words[0] == "raise-after-set":
            STATE[words[1]] = words[2]
            raise RuntimeError("deliberate exception after setting " + words[1])
        reply = misbehave(text)
        if reply is None:
            raise Err(f"unknown command {text!r}")
        return reply

    def apply_batch(self, entries):
        out = []
        for e in entries:
            try:
                out.append(Ok(self.apply(e.context, e.command)))
            except Err as err:
                out.append(err)
        return out

    def query(self, request):
        text = bytes(request).decode(errors="replace")
        words = text.split()
        if len(words) == 2 and words[0] == "get":
            if words[1] not in STATE:
                raise Err(f"no value {words[1]}")
            return STATE[words[1]].encode()
        reply = misbehave(text)
        if reply is None:
            raise Err("unknown query")
        return reply

    def snapshot(self):
        print("snapshot of %d values" % len(STATE), flush=True)
        print("snapshot, on stderr", file=sys.stderr, flush=True)
        if "raise-on-snapshot" in STATE:
            raise RuntimeError("deliberate exception in snapshot")
        return json.dumps(STATE, sort_keys=True).encode()

    def restore(self, snapshot):
        global STATE
        STATE = json.loads(bytes(snapshot)) if snapshot else {}
        print("restored %d values" % len(STATE), flush=True)
        print("restored, on stderr", file=sys.stderr, flush=True)
