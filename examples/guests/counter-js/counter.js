// Named counters with typed JSON commands, in JavaScript: the same commands and replies as the
// Rust `counter` guest (examples/guests/counter), written with the `waft_json.js` helper.
//
// Build (ComponentizeJS, installed by `npm install --prefix examples/guests/kv-js`):
//
//   examples/guests/kv-js/node_modules/.bin/componentize-js examples/guests/counter-js/counter.js \
//       --wit wit -n guest -d http fetch-event -o counter-js.wasm
//
// Commands: {"add": {"name": "hits", "by": 5}} -> the new value; {"reset": {"name": "hits"}} ->
// the old value. Queries: {"get": {"name": "hits"}} -> {"value", "changed_at_index",
// "changed_at_ms"}; "list" -> {name: value} in name order.
//
// Values are 64-bit like the Rust guest's: BigInts, range-checked. Snapshots are canonical
// JSON (keys in code point order); the Rust guest reads them and this one reads the Rust
// guest's, so a hot-swap between the two keeps the counters.

import {
  I64_MAX,
  I64_MIN,
  JsonStateMachine,
  Reject,
  byCodePoint,
  field,
  isObject,
  jsonExports,
  variant,
} from "../helpers/js/waft_json.js";

class Counters extends JsonStateMachine {
  constructor() {
    super();
    this.counters = Object.create(null);
  }

  apply(context, command) {
    const [tag, fields] = variant(command, { add: ["name", "by"], reset: ["name"] });
    const name = field(fields.name, "string", "name");
    if (tag === "add") {
      const by = field(fields.by, "int", "by");
      if (by < I64_MIN || by > I64_MAX) throw new Reject("malformed command: by is out of range");
      const old = Object.hasOwn(this.counters, name) ? this.counters[name].value : 0n;
      // Check before changing anything: a rejected command must leave no trace.
      if (old + by < I64_MIN || old + by > I64_MAX) throw new Reject(`counter ${name} would overflow`);
      this.counters[name] = {
        value: old + by,
        changed_at_index: context.index,
        changed_at_ms: context.timestampMs,
      };
      return old + by;
    }
    if (!Object.hasOwn(this.counters, name)) throw new Reject(`no counter named ${name}`);
    const old = this.counters[name].value;
    delete this.counters[name];
    return old;
  }

  query(request) {
    const [tag, fields] = variant(request, { get: ["name"], list: [] });
    if (tag === "list") {
      const out = Object.create(null);
      for (const name of Object.keys(this.counters).sort(byCodePoint)) out[name] = this.counters[name].value;
      return out;
    }
    const name = field(fields.name, "string", "name");
    if (!Object.hasOwn(this.counters, name)) throw new Reject(`no counter named ${name}`);
    const c = this.counters[name];
    return { value: c.value, changed_at_index: c.changed_at_index, changed_at_ms: c.changed_at_ms };
  }

  static fromState(state) {
    const machine = super.fromState(state);
    if (!isObject(machine.counters)) throw new Reject("counters must be an object");
    for (const [name, c] of Object.entries(machine.counters)) {
      const keys = isObject(c) ? Object.keys(c).sort() : [];
      if (keys.join() !== "changed_at_index,changed_at_ms,value") throw new Reject(`counter ${name} is not a counter`);
    }
    return machine;
  }
}

export const stateMachine = jsonExports(Counters);
