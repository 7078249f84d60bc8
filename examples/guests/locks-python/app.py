"""A lock service with TTL'd locks, in Python: a waft:fsm@0.2.0 guest whose locks expire by
themselves (timers) and which tells watchers who holds what (events).

Build (componentize-py 0.25.1 from PyPI), against the 0.2.0 world:

    componentize-py -d wit/v0.2 -w guest componentize app -p examples/guests/locks-python \
        -p examples/guests/helpers/python -o locks-python.wasm

Commands (JSON):
  {"acquire": {"lock": "L", "owner": "a", "ttl_ms": 5000}}
      -> {"granted": true, "token": N, "expires_ms": T} when the lock is free (or already
         the owner's: the TTL starts again, same token), else {"granted": false,
         "holder": "b", "expires_ms": T}. The token (the log index that granted the lock)
         grows with every grant: a fencing token for what the holder then writes elsewhere.
  {"release": {"lock": "L", "owner": "a", "token": N}} -> true; refused unless a holds L
         with token N.
Queries: {"holder": {"lock": "L"}} -> {"owner", "token", "expires_ms"} or null; "list" ->
         {lock: owner}.

A lock not released expires when its timer fires, TTL after its grant or last acquire by its
holder, on the log's clock: every replica frees it at the same entry, across leader changes.
Events (topic, data = the lock's name): locks/acquired, locks/released, locks/expired.
"""

from waft_det import deterministic  # first: it must see every random.Random() made after it
from waft_json import JsonStateMachine, Reject, field, json_exports, variant

from wit_world import exports
from wit_world.imports import events, timers

MAX_TTL_MS = 24 * 3600 * 1000


def timer_key(lock):
    return "lock/" + lock


class Locks(JsonStateMachine):
    def __init__(self):
        # lock name -> {"owner", "token", "expires_ms"}
        self.locks = {}

    def apply(self, context, command):
        tag, fields = variant(
            command,
            {"acquire": ("lock", "owner", "ttl_ms"), "release": ("lock", "owner", "token")},
        )
        lock = field(fields["lock"], str, "lock")
        owner = field(fields["owner"], str, "owner")
        if not lock or not owner:
            raise Reject("lock and owner must not be empty")
        held = self.locks.get(lock)
        if tag == "acquire":
            ttl = field(fields["ttl_ms"], int, "ttl_ms")
            if not 0 < ttl <= MAX_TTL_MS:
                raise Reject("ttl_ms must be between 1 and %d" % MAX_TTL_MS)
            if held is not None and held["owner"] != owner:
                return {"granted": False, "holder": held["owner"], "expires_ms": held["expires_ms"]}
            expires = context.timestamp_ms + ttl
            token = held["token"] if held is not None else context.index
            self.locks[lock] = {"owner": owner, "token": token, "expires_ms": expires}
            timers.set(timer_key(lock), expires, b"")
            events.emit("locks/acquired", lock.encode())
            return {"granted": True, "token": token, "expires_ms": expires}
        token = field(fields["token"], int, "token")
        if held is None or held["owner"] != owner or held["token"] != token:
            raise Reject("%s does not hold %s with token %d" % (owner, lock, token))
        del self.locks[lock]
        timers.cancel(timer_key(lock))
        events.emit("locks/released", lock.encode())
        return True

    def fire(self, context, key, payload):
        lock = key[len("lock/"):]
        held = self.locks.get(lock)
        if not key.startswith("lock/") or held is None:
            raise Reject("timer %s: no such lock" % key)
        if held["expires_ms"] > context.timestamp_ms:
            raise Reject("timer %s fired early" % key)
        del self.locks[lock]
        events.emit("locks/expired", lock.encode())

    def query(self, request):
        tag, fields = variant(request, {"holder": ("lock",), "list": ()})
        if tag == "list":
            return {name: self.locks[name]["owner"] for name in sorted(self.locks)}
        return self.locks.get(field(fields["lock"], str, "lock"))

    @classmethod
    def from_state(cls, state):
        machine = super().from_state(state)
        if not isinstance(machine.locks, dict):
            raise Reject("locks must be an object")
        for name, held in machine.locks.items():
            if not isinstance(held, dict) or set(held) != {"owner", "token", "expires_ms"}:
                raise Reject("lock %s is not a lock" % name)
        return machine


@deterministic
@json_exports(Locks)
class StateMachine(exports.StateMachine):
    pass
