// A lock service with TTL'd locks, in JavaScript: the Python lock service's commands, replies
// and snapshot (examples/guests/locks-python), a waft:fsm@0.2.0 guest whose locks expire by
// themselves (timers) and which tells watchers who holds what (events).
//
// Build (ComponentizeJS, installed by `npm install --prefix examples/guests/kv-js`), against
// the 0.2.0 world:
//
//   examples/guests/kv-js/node_modules/.bin/componentize-js examples/guests/locks-js/locks.js \
//       --wit wit/v0.2 -n guest -d http fetch-event -o locks-js.wasm
//
// Commands: {"acquire": {"lock": "L", "owner": "a", "ttl_ms": 5000}} -> {"granted": true,
// "token": N, "expires_ms": T} or {"granted": false, "holder": "b", "expires_ms": T};
// {"release": {"lock": "L", "owner": "a", "token": N}} -> true. Queries: {"holder": {"lock":
// "L"}}, "list". A lock not released expires when its timer fires; events locks/acquired,
// locks/released, locks/expired carry the lock's name.

import { cancel as cancelTimer, set as setTimer } from "waft:fsm/timers@0.2.0";
import { emit } from "waft:fsm/events@0.2.0";
import { JsonStateMachine, Reject, field, isObject, jsonExports, variant } from "../helpers/js/waft_json.js";

const MAX_TTL_MS = 24n * 3600n * 1000n;
const encoder = new TextEncoder();
const timerKey = (lock) => `lock/${lock}`;

class Locks extends JsonStateMachine {
  constructor() {
    super();
    // lock name -> {owner, token, expires_ms}
    this.locks = Object.create(null);
  }

  apply(context, command) {
    const [tag, fields] = variant(command, {
      acquire: ["lock", "owner", "ttl_ms"],
      release: ["lock", "owner", "token"],
    });
    const lock = field(fields.lock, "string", "lock");
    const owner = field(fields.owner, "string", "owner");
    if (!lock || !owner) throw new Reject("lock and owner must not be empty");
    const held = this.locks[lock];
    if (tag === "acquire") {
      const ttl = field(fields.ttl_ms, "int", "ttl_ms");
      if (ttl <= 0n || ttl > MAX_TTL_MS) throw new Reject(`ttl_ms must be between 1 and ${MAX_TTL_MS}`);
      if (held !== undefined && held.owner !== owner) {
        return { granted: false, holder: held.owner, expires_ms: held.expires_ms };
      }
      const expires = context.timestampMs + ttl;
      const token = held !== undefined ? held.token : context.index;
      this.locks[lock] = { owner, token, expires_ms: expires };
      setTimer(timerKey(lock), expires, new Uint8Array());
      emit("locks/acquired", encoder.encode(lock));
      return { granted: true, token, expires_ms: expires };
    }
    const token = field(fields.token, "int", "token");
    if (held === undefined || held.owner !== owner || held.token !== token) {
      throw new Reject(`${owner} does not hold ${lock} with token ${token}`);
    }
    delete this.locks[lock];
    cancelTimer(timerKey(lock));
    emit("locks/released", encoder.encode(lock));
    return true;
  }

  fire(context, key, _payload) {
    const lock = key.slice("lock/".length);
    const held = this.locks[lock];
    if (!key.startsWith("lock/") || held === undefined) throw new Reject(`timer ${key}: no such lock`);
    if (held.expires_ms > context.timestampMs) throw new Reject(`timer ${key} fired early`);
    delete this.locks[lock];
    emit("locks/expired", encoder.encode(lock));
  }

  query(request) {
    const [tag, fields] = variant(request, { holder: ["lock"], list: [] });
    if (tag === "list") {
      const out = Object.create(null);
      for (const name of Object.keys(this.locks).sort()) out[name] = this.locks[name].owner;
      return out;
    }
    return this.locks[field(fields.lock, "string", "lock")] ?? null;
  }

  static fromState(state) {
    const machine = super.fromState(state);
    if (!isObject(machine.locks)) throw new Reject("locks must be an object");
    const locks = Object.create(null);
    for (const [name, held] of Object.entries(machine.locks)) {
      const keys = isObject(held) ? Object.keys(held).sort().join(",") : "";
      if (keys !== "expires_ms,owner,token") throw new Reject(`lock ${name} is not a lock`);
      locks[name] = held;
    }
    machine.locks = locks;
    return machine;
  }
}

export const stateMachine = jsonExports(Locks);
