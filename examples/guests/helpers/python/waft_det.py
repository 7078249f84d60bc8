"""Deterministic Python guests for waft: wrap your exported state machine with `deterministic`.

waft makes most of what a Python guest can observe deterministic by itself: `time.time()` and
`time.monotonic()` read the entry's timestamp; `os.urandom`, `secrets`, `uuid.uuid4()` and a
`random.Random()` created during a call draw from a stream seeded by the module hash and the
log index; `hash()` of str and bytes (and so set iteration order) uses a hash secret fixed when
the component was built, the same in every instance of that build.

What the host cannot reach is a generator that lives across calls inside the interpreter:
`random.random()`, `random.choice()` ... (the `random` module's own generator) and any
`random.Random()` created at import time. componentize-py seeds the module's generator once,
at an instance's first call, so its values depend on when the instance was created. waft keeps
replicas equal anyway (every replica's instance has the same history), but a value drawn from it
then depends on the history of the instance, which `waft exec --verify` reports. This module
reseeds them before every call, from the entry's deterministic stream, so that each entry draws
the same values whatever happened before:

    from waft_det import deterministic

    @deterministic
    class StateMachine(exports.StateMachine):
        ...

Build with this directory on the path: `componentize-py ... componentize app -p . -p
examples/guests/helpers/python -o guest.wasm`. A `random.Random(seed)` you seed yourself is
yours: keep its state in your snapshot (`getstate()`) if you keep it across calls. `waft check`
says whether a Python guest uses this module.
"""

import functools
import os
import random
import weakref

# `waft check` finds this string in the component to tell that the helper is in it.
MARKER = "waft-determinism-helper:python:1"

_unseeded = weakref.WeakSet()
_random_init = random.Random.__init__


def _init(self, x=None, *args, **kwargs):
    _random_init(self, x, *args, **kwargs)
    if x is None and type(self) is not random.SystemRandom:
        _unseeded.add(self)


random.Random.__init__ = _init


def _seed():
    return int.from_bytes(os.urandom(32), "little")


def reseed():
    """Reseeds `random`'s generator and every unseeded `random.Random()` from the call's
    deterministic stream (waft reseeds that stream for each call from the module hash, the log
    index and the kind of call)."""
    random.seed(_seed())
    for generator in list(_unseeded):
        generator.seed(_seed())


def _wrap(method):
    @functools.wraps(method)
    def call(self, *args):
        reseed()
        return method(self, *args)

    return call


EXPORTS = ("apply", "apply_batch", "fire", "query", "snapshot", "restore")


def deterministic(cls):
    """Class decorator for the exported state machine: reseeds before each of its calls."""
    for name in EXPORTS:
        if name in cls.__dict__:
            setattr(cls, name, _wrap(cls.__dict__[name]))
    cls.__waft_deterministic__ = MARKER
    return cls
