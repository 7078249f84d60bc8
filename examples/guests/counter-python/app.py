"""Named counters with typed JSON commands, in Python: the same commands and replies as the
Rust `counter` guest (examples/guests/counter), written with the `waft_json` helper.

Build (componentize-py 0.25.1 from PyPI):

    componentize-py -d wit -w guest componentize app -p examples/guests/counter-python \
        -p examples/guests/helpers/python -o counter-python.wasm

Commands: {"add": {"name": "hits", "by": 5}} -> the new value; {"reset": {"name": "hits"}} ->
the old value. Queries: {"get": {"name": "hits"}} -> {"value", "changed_at_index",
"changed_at_ms"}; "list" -> {name: value} in name order.

Values are 64-bit like the Rust guest's (Python's integers are not: the range is checked).
Snapshots are canonical JSON (keys sorted); the Rust guest reads them and this one reads the
Rust guest's, so a hot-swap between the two keeps the counters.
"""

from waft_det import deterministic  # first: it must see every random.Random() made after it
from waft_json import JsonStateMachine, Reject, field, json_exports, variant

from wit_world import exports

I64 = range(-(2**63), 2**63)


class Counters(JsonStateMachine):
    def __init__(self):
        self.counters = {}

    def apply(self, context, command):
        tag, fields = variant(command, {"add": ("name", "by"), "reset": ("name",)})
        name = field(fields["name"], str, "name")
        if tag == "add":
            by = field(fields["by"], int, "by")
            if by not in I64:
                raise Reject("malformed command: by is out of range")
            old = self.counters.get(name, {"value": 0})["value"]
            # Check before changing anything: a rejected command must leave no trace.
            if old + by not in I64:
                raise Reject("counter %s would overflow" % name)
            self.counters[name] = {
                "value": old + by,
                "changed_at_index": context.index,
                "changed_at_ms": context.timestamp_ms,
            }
            return old + by
        if name not in self.counters:
            raise Reject("no counter named %s" % name)
        return self.counters.pop(name)["value"]

    def query(self, request):
        tag, fields = variant(request, {"get": ("name",), "list": ()})
        if tag == "list":
            return {name: self.counters[name]["value"] for name in sorted(self.counters)}
        name = field(fields["name"], str, "name")
        if name not in self.counters:
            raise Reject("no counter named %s" % name)
        c = self.counters[name]
        return {
            "value": c["value"],
            "changed_at_index": c["changed_at_index"],
            "changed_at_ms": c["changed_at_ms"],
        }

    @classmethod
    def from_state(cls, state):
        machine = super().from_state(state)
        if not isinstance(machine.counters, dict):
            raise Reject("counters must be an object")
        for name, c in machine.counters.items():
            if not isinstance(c, dict) or set(c) != {"value", "changed_at_index", "changed_at_ms"}:
                raise Reject("counter %s is not a counter" % name)
        return machine


@deterministic
@json_exports(Counters)
class StateMachine(exports.StateMachine):
    pass
