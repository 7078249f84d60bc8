"""Typed JSON state machines for Python guests, like the Rust SDK's `waft_guest::json`.

Write the state machine as a plain class over parsed JSON, and let `json_exports` make the
byte-level exports: commands and queries arrive parsed, replies leave as compact JSON, the
snapshot is the state as canonical JSON (keys sorted), and a rejection is an exception.

    from waft_det import deterministic
    from waft_json import JsonStateMachine, Reject, json_exports, variant
    from wit_world import exports

    class Counters(JsonStateMachine):
        def __init__(self):
            self.counters = {}

        def apply(self, context, command):          # command: parsed JSON
            tag, fields = variant(command, {"add": ("name", "by")})
            ...
            raise Reject("no counter named x")       # the state must be unchanged

        def query(self, request):
            ...

    @deterministic
    @json_exports(Counters)
    class StateMachine(exports.StateMachine):
        pass

A waft:fsm@0.2.0 guest (built with `-d wit/v0.2`) may also implement `fire(context, key,
payload)` for its timers, and set timers and emit events with the generated imports
(`from wit_world.imports import timers, events`; see examples/guests/locks-python).

The state is the instance's attributes (`vars(self)`), which must be JSON: dicts with string
keys, lists, strings, numbers (no NaN), booleans, None. Override `state()` and `from_state()`
to choose another shape. Replies keep the order in which their dicts were built (deterministic
in Python); snapshots sort every dict's keys, so equal states give equal bytes.
"""

import abc
import json

from componentize_py_types import Err, Ok


class Reject(Exception):
    """Raise from `apply` or `query` to answer with an error; leave the state unchanged."""


class Malformed(Reject):
    """A command or query without the expected shape (raised by `variant` and `field`)."""


class JsonStateMachine:
    """Subclass it; implement `apply(context, command)` and `query(request)`."""

    def apply(self, context, command):
        raise NotImplementedError

    def query(self, request):
        raise NotImplementedError

    def fire(self, context, key, payload):
        """A due timer (waft:fsm@0.2.0 guests that set timers): `payload` is bytes. Raise
        `Reject` to refuse it (the state must be unchanged; the timer is dropped)."""
        raise Reject("this guest sets no timers (timer %s)" % key)

    def state(self):
        """What the snapshot holds: by default the instance's attributes."""
        return dict(vars(self))

    @classmethod
    def from_state(cls, state):
        """Rebuilds a machine from `state()`'s value; raise `Reject` if it is not one."""
        if not isinstance(state, dict):
            raise Reject("the snapshot is not a JSON object")
        machine = cls()
        unknown = set(state) - set(vars(machine))
        if unknown:
            raise Reject("the snapshot has unknown fields: %s" % ", ".join(sorted(unknown)))
        vars(machine).update(state)
        return machine


def variant(value, shapes):
    """Reads an externally tagged variant, as serde writes Rust enums: `"tag"` for a variant
    without fields, `{"tag": {"field": ...}}` for one with. `shapes` maps each tag to its field
    names (an empty tuple: no fields). Returns (tag, {field: value}); raises `Malformed`."""
    expected = ", ".join("`%s`" % t for t in shapes)
    if isinstance(value, str):
        if shapes.get(value) == ():
            return value, {}
        raise Malformed("unknown variant `%s`, expected one of %s" % (value, expected))
    if not isinstance(value, dict) or len(value) != 1:
        raise Malformed("expected a string or an object with one key, one of %s" % expected)
    ((tag, fields),) = value.items()
    if tag not in shapes:
        raise Malformed("unknown variant `%s`, expected one of %s" % (tag, expected))
    names = shapes[tag]
    if not names:
        if fields is not None:
            raise Malformed("variant `%s` takes no fields" % tag)
        return tag, {}
    if not isinstance(fields, dict):
        raise Malformed("variant `%s` takes an object with %s" % (tag, ", ".join(names)))
    missing = [n for n in names if n not in fields]
    if missing:
        raise Malformed("missing field `%s` in `%s`" % (missing[0], tag))
    extra = sorted(set(fields) - set(names))
    if extra:
        raise Malformed("unknown field `%s` in `%s`" % (extra[0], tag))
    return tag, fields


def field(value, kind, what):
    """Checks that `value` is of `kind` (`int` excludes booleans, as JSON does); raises
    `Malformed` naming `what`."""
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise Malformed("%s must be %s" % (what, {int: "an integer", str: "a string"}.get(kind, kind.__name__)))
    return value


def _reply(value):
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise Err("cannot encode reply: %s" % e)


def _parse(what, data):
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Err("malformed %s: %s" % (what, e))


def json_exports(machine_class):
    """Class decorator for the exported `StateMachine`: defines its five exports over one
    `machine_class` instance. Put it under `@deterministic`."""

    holder = {"machine": machine_class()}

    def apply_one(context, command):
        parsed = _parse("command", command)
        try:
            reply = holder["machine"].apply(context, parsed)
        except Malformed as e:
            raise Err("malformed command: %s" % e)
        except Reject as e:
            raise Err(str(e))
        return _reply(reply)

    def apply(self, context, command):
        return apply_one(context, command)

    def apply_batch(self, entries):
        results = []
        for entry in entries:
            try:
                results.append(Ok(apply_one(entry.context, entry.command)))
            except Err as e:
                results.append(e)
        return results

    def fire(self, context, key, payload):
        try:
            holder["machine"].fire(context, key, bytes(payload))
        except Reject as e:
            raise Err(str(e))

    def query(self, request):
        parsed = _parse("query", request)
        try:
            reply = holder["machine"].query(parsed)
        except Malformed as e:
            raise Err("malformed query: %s" % e)
        except Reject as e:
            raise Err(str(e))
        return _reply(reply)

    def snapshot(self):
        return json.dumps(
            holder["machine"].state(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        ).encode()

    def restore(self, data):
        # Built aside and swapped in last: a refused snapshot leaves the state as it was.
        parsed = _parse("snapshot", data)
        try:
            machine = machine_class.from_state(parsed)
        except Reject as e:
            raise Err("malformed snapshot: %s" % e)
        holder["machine"] = machine

    def decorate(cls):
        # A waft:fsm@0.1.0 world has no `fire` export; defining it there is harmless.
        for f in (apply, apply_batch, fire, query, snapshot, restore):
            setattr(cls, f.__name__, f)
        # The exports are abstract methods of the generated base class: recount them now.
        abc.update_abstractmethods(cls)
        return cls

    return decorate
