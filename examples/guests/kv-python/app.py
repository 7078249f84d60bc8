"""A replicated key-value store in Python: the same commands, replies and snapshot bytes as the
Rust `kv` guest, so either can replace the other with `waft deploy` (hot-swap keeps the state).

Build (componentize-py from PyPI; `just guest-python` does this, into target/guests/):

    componentize-py -d wit -w guest componentize app -p examples/guests/kv-python \
        -p examples/guests/helpers/python -o kv-python.wasm

Commands: put KEY VALUE | get KEY | del KEY | cas KEY EXPECTED NEW | scan PREFIX
Queries:  get KEY | scan [PREFIX]

Determinism: state lives in a dict, but every ordered output (scan, snapshot) is sorted by key,
so nothing depends on insertion or hash order. Python's str order is code-point order, which is
the UTF-8 byte order the Rust guest's BTreeMap uses.
"""

from waft_det import deterministic  # first: it must see every random.Random() made after it

import struct

from wit_world import exports
from componentize_py_types import Err, Ok
from wit_world.imports import host

MAGIC = b"WKV1"

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}


def debug(text):
    """Quotes text the way Rust's `{:?}` does (for the ASCII range), so errors match the Rust kv."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u{%x}" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def word(text):
    """Splits off the first space-separated word (after leading whitespace)."""
    text = text.lstrip()
    head, sep, rest = text.partition(" ")
    return (head, rest) if sep else (text, "")


def need(what, value, usage):
    if not value:
        raise Err(f"missing {what}; usage: {usage}")
    return value


def utf8(data, what):
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise Err(f"{what} is not UTF-8")


class Kv:
    def __init__(self):
        self.entries = {}

    def get(self, key):
        key = need("KEY", key.strip(), "get KEY")
        if key not in self.entries:
            raise Err(f"key not found: {key}")
        return self.entries[key].encode()

    def scan(self, prefix):
        prefix = prefix.strip()
        keys = sorted(k for k in self.entries if k.startswith(prefix))
        return "".join(f"{k} {self.entries[k]}\n" for k in keys).encode()

    def apply(self, command):
        verb, rest = word(utf8(command, "command"))
        if verb == "put":
            key, value = word(rest)
            key = need("KEY", key, "put KEY VALUE")
            self.entries[key] = value
            return b"OK"
        if verb == "get":
            return self.get(rest)
        if verb == "del":
            key = need("KEY", rest.strip(), "del KEY")
            if self.entries.pop(key, None) is None:
                raise Err(f"key not found: {key}")
            return b"OK"
        if verb == "cas":
            usage = "cas KEY EXPECTED NEW"
            key, rest = word(rest)
            expected, new = word(rest)
            key = need("KEY", key, usage)
            expected = need("EXPECTED", expected, usage)
            if key not in self.entries:
                raise Err(f"key not found: {key}")
            current = self.entries[key]
            if current != expected:
                raise Err(f"compare failed: {key} is {current}")
            self.entries[key] = new
            return b"OK"
        if verb == "scan":
            return self.scan(rest)
        if verb == "":
            raise Err("empty command; try: put KEY VALUE")
        raise Err(f"unknown command {debug(verb)}; expected put, get, del, cas or scan")

    def query(self, request):
        verb, rest = word(utf8(request, "query"))
        if verb == "get":
            return self.get(rest)
        if verb == "scan":
            return self.scan(rest)
        raise Err(f"unknown query {debug(verb)}; queries are get KEY and scan [PREFIX]")

    def snapshot(self):
        parts = [MAGIC, struct.pack("<Q", len(self.entries))]
        for key in sorted(self.entries):
            for field in (key.encode(), self.entries[key].encode()):
                parts.append(struct.pack("<I", len(field)))
                parts.append(field)
        return b"".join(parts)

    @staticmethod
    def restore(data):
        data = bytes(data)
        if data[:4] != MAGIC:
            raise Err("not a kv snapshot (bad magic)")
        pos = 4

        def take(n):
            nonlocal pos
            if len(data) - pos < n:
                raise Err("kv snapshot is truncated")
            chunk = data[pos : pos + n]
            pos += n
            return chunk

        def string():
            (length,) = struct.unpack("<I", take(4))
            try:
                return take(length).decode("utf-8")
            except UnicodeDecodeError:
                raise Err("kv snapshot holds invalid UTF-8")

        (count,) = struct.unpack("<Q", take(8))
        kv = Kv()
        for _ in range(count):
            key = string()
            kv.entries[key] = string()
        if pos != len(data):
            raise Err("kv snapshot has trailing bytes")
        return kv


STATE = Kv()


@deterministic  # reseeds `random` before every call (this guest draws none; the pattern to copy)
class StateMachine(exports.StateMachine):
    def apply(self, context, command):
        return STATE.apply(command)

    def apply_batch(self, entries):
        results = []
        for entry in entries:
            try:
                results.append(Ok(STATE.apply(entry.command)))
            except Err as e:
                results.append(e)
        return results

    def query(self, request):
        return STATE.query(request)

    def snapshot(self):
        return STATE.snapshot()

    def restore(self, snapshot):
        # A refused snapshot raises before STATE is replaced: the old state stays.
        global STATE
        STATE = Kv.restore(snapshot)
        host.log(host.Level.DEBUG, f"restored {len(STATE.entries)} keys")
