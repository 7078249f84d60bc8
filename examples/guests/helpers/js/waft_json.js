// Typed JSON state machines for JavaScript guests, like the Rust SDK's `waft_guest::json` and
// the Python helper `waft_json.py`.
//
// Write the state machine as a class over parsed JSON and let `jsonExports` make the byte-level
// exports: commands and queries arrive parsed, replies leave as compact JSON, the snapshot is
// the state as canonical JSON (every object's keys in code point order, the order of the Rust
// guests' BTreeMaps), and a rejection is a thrown `Reject`.
//
//   import { JsonStateMachine, Reject, field, jsonExports, variant } from "../helpers/js/waft_json.js";
//
//   class Counters extends JsonStateMachine {
//     constructor() { super(); this.counters = {}; }
//     apply(context, command) {               // command: parsed JSON
//       const [tag, fields] = variant(command, { add: ["name", "by"], reset: ["name"] });
//       ...
//       throw new Reject("no counter named x"); // the state must be unchanged
//     }
//     query(request) { ... }
//   }
//   export const stateMachine = jsonExports(Counters);
//
// A waft:fsm@0.2.0 guest (built with `--wit wit/v0.2`) may implement `fire(context, key,
// payload)` for its timers and import `waft:fsm/timers@0.2.0` and `waft:fsm/events@0.2.0` to
// set timers and emit events.
//
// Numbers: JSON integers outside JavaScript's safe range (2^53) would lose digits in a plain
// `JSON.parse`, so this parser reads every integer as a BigInt (`field(v, "int", ...)` checks
// for one); floats stay Numbers. BigInts are written back as their digits, so 64-bit values
// round-trip exactly, as in the Rust guest. The context's index, term and timestamp are BigInts
// too (WIT u64). Objects are parsed without a prototype (a key `__proto__` is just a key).

export class Reject extends Error {}

// A command or query without the expected shape (thrown by `variant` and `field`).
export class Malformed extends Reject {}

export class JsonStateMachine {
  apply(_context, _command) {
    throw new Error("apply is not implemented");
  }

  query(_request) {
    throw new Error("query is not implemented");
  }

  // A due timer (waft:fsm@0.2.0 guests that set timers; `payload` is a Uint8Array). Throw
  // `Reject` to refuse it (the state must be unchanged; the timer is dropped).
  fire(_context, key, _payload) {
    throw new Reject(`this guest sets no timers (timer ${key})`);
  }

  // What the snapshot holds: by default the instance's own fields.
  state() {
    return Object.assign(Object.create(null), this);
  }

  // Rebuilds a machine from `state()`'s value; throw `Reject` if it is not one.
  static fromState(state) {
    if (!isObject(state)) throw new Reject("the snapshot is not a JSON object");
    const machine = new this();
    const unknown = Object.keys(state).filter((k) => !Object.hasOwn(machine, k));
    if (unknown.length) throw new Reject(`the snapshot has unknown fields: ${unknown.sort(byCodePoint).join(", ")}`);
    Object.assign(machine, state);
    return machine;
  }
}

export function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

// Reads an externally tagged variant, as serde writes Rust enums: "tag" for a variant without
// fields, {"tag": {"field": ...}} for one with. `shapes` maps each tag to its field names (an
// empty array: no fields). Returns [tag, fields]; throws `Malformed`.
export function variant(value, shapes) {
  const tags = Object.keys(shapes);
  const expected = tags.map((t) => `\`${t}\``).join(", ");
  if (typeof value === "string") {
    if (Object.hasOwn(shapes, value) && shapes[value].length === 0) return [value, Object.create(null)];
    throw new Malformed(`unknown variant \`${value}\`, expected one of ${expected}`);
  }
  if (!isObject(value) || Object.keys(value).length !== 1) {
    throw new Malformed(`expected a string or an object with one key, one of ${expected}`);
  }
  const [tag] = Object.keys(value);
  const fields = value[tag];
  if (!Object.hasOwn(shapes, tag)) throw new Malformed(`unknown variant \`${tag}\`, expected one of ${expected}`);
  const names = shapes[tag];
  if (names.length === 0) {
    if (fields !== null) throw new Malformed(`variant \`${tag}\` takes no fields`);
    return [tag, Object.create(null)];
  }
  if (!isObject(fields)) throw new Malformed(`variant \`${tag}\` takes an object with ${names.join(", ")}`);
  const missing = names.find((n) => !Object.hasOwn(fields, n));
  if (missing !== undefined) throw new Malformed(`missing field \`${missing}\` in \`${tag}\``);
  const extra = Object.keys(fields).filter((k) => !names.includes(k)).sort(byCodePoint);
  if (extra.length) throw new Malformed(`unknown field \`${extra[0]}\` in \`${tag}\``);
  return [tag, fields];
}

const KINDS = {
  int: ["an integer", (v) => typeof v === "bigint"],
  string: ["a string", (v) => typeof v === "string"],
  bool: ["a boolean", (v) => typeof v === "boolean"],
  number: ["a number", (v) => typeof v === "bigint" || typeof v === "number"],
  array: ["an array", Array.isArray],
  object: ["an object", isObject],
};

// Checks that `value` is of `kind` ("int", "string", "bool", "number", "array", "object");
// throws `Malformed` naming `what`. Integers are BigInts.
export function field(value, kind, what) {
  const [words, test] = KINDS[kind];
  if (!test(value)) throw new Malformed(`${what} must be ${words}`);
  return value;
}

export const I64_MIN = -(2n ** 63n);
export const I64_MAX = 2n ** 63n - 1n;

// Compares by Unicode code point: UTF-8 byte order, the order of a Rust BTreeMap<String, _>.
export function byCodePoint(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; ) {
    const x = a.codePointAt(i);
    const y = b.codePointAt(i);
    if (x !== y) return x < y ? -1 : 1;
    i += x > 0xffff ? 2 : 1;
  }
  return a.length - b.length;
}

// --- parsing ---

const strict = new TextDecoder("utf-8", { fatal: true });

class Parser {
  constructor(text) {
    this.text = text;
    this.at = 0;
  }

  fail(message) {
    throw new SyntaxError(`${message} at character ${this.at}`);
  }

  space() {
    while (this.at < this.text.length && " \t\n\r".includes(this.text[this.at])) this.at++;
  }

  value() {
    this.space();
    const c = this.text[this.at];
    if (c === "{") return this.object();
    if (c === "[") return this.array();
    if (c === '"') return this.string();
    if (c === "-" || (c >= "0" && c <= "9")) return this.number();
    for (const [word, value] of [["true", true], ["false", false], ["null", null]]) {
      if (this.text.startsWith(word, this.at)) {
        this.at += word.length;
        return value;
      }
    }
    return this.fail(c === undefined ? "unexpected end of input" : `unexpected ${JSON.stringify(c)}`);
  }

  object() {
    this.at++;
    const out = Object.create(null);
    this.space();
    if (this.text[this.at] === "}") {
      this.at++;
      return out;
    }
    for (;;) {
      this.space();
      if (this.text[this.at] !== '"') this.fail("expected a key");
      const key = this.string();
      this.space();
      if (this.text[this.at] !== ":") this.fail("expected ':'");
      this.at++;
      out[key] = this.value();
      this.space();
      const c = this.text[this.at++];
      if (c === "}") return out;
      if (c !== ",") this.fail("expected ',' or '}'");
    }
  }

  array() {
    this.at++;
    const out = [];
    this.space();
    if (this.text[this.at] === "]") {
      this.at++;
      return out;
    }
    for (;;) {
      out.push(this.value());
      this.space();
      const c = this.text[this.at++];
      if (c === "]") return out;
      if (c !== ",") this.fail("expected ',' or ']'");
    }
  }

  string() {
    // The JSON grammar of a string, checked by the engine's own parser.
    const m = /^"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/.exec(this.text.slice(this.at));
    if (!m) this.fail("malformed string");
    this.at += m[0].length;
    return JSON.parse(m[0]);
  }

  number() {
    const m = /^-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(this.text.slice(this.at));
    if (!m) this.fail("malformed number");
    this.at += m[0].length;
    if (m[1] === undefined && m[2] === undefined) return BigInt(m[0]);
    return Number(m[0]);
  }
}

// Parses JSON text (bytes or a string): integers as BigInts, objects without prototypes.
export function parse(input) {
  const text = typeof input === "string" ? input : strict.decode(input);
  const p = new Parser(text);
  const value = p.value();
  p.space();
  if (p.at !== text.length) p.fail("trailing characters");
  return value;
}

// --- writing ---

// Compact JSON of `value`; with `sortKeys`, every object's keys in code point order.
export function stringify(value, sortKeys = false) {
  if (value === null) return "null";
  switch (typeof value) {
    case "boolean":
      return value ? "true" : "false";
    case "bigint":
      return value.toString();
    case "number":
      if (!Number.isFinite(value)) throw new TypeError(`${value} is not JSON`);
      return JSON.stringify(value);
    case "string":
      return JSON.stringify(value);
    case "object": {
      if (Array.isArray(value)) return `[${value.map((v) => stringify(v, sortKeys)).join(",")}]`;
      const keys = Object.keys(value);
      if (sortKeys) keys.sort(byCodePoint);
      return `{${keys.map((k) => `${JSON.stringify(k)}:${stringify(value[k], sortKeys)}`).join(",")}}`;
    }
    default:
      throw new TypeError(`a ${typeof value} is not JSON`);
  }
}

const encoder = new TextEncoder();

function parsed(what, bytes) {
  try {
    return parse(bytes);
  } catch (e) {
    throw new Reject(`malformed ${what}: ${e.message}`);
  }
}

function encoded(reply) {
  try {
    return encoder.encode(stringify(reply));
  } catch (e) {
    throw new Reject(`cannot encode reply: ${e.message}`);
  }
}

// The `stateMachine` export over one instance of `Machine` (a JsonStateMachine subclass):
// `export const stateMachine = jsonExports(Counters);`.
export function jsonExports(Machine) {
  let machine = new Machine();

  // A Reject becomes the WIT `err` (a thrown string); anything else traps (rolled back).
  function guarded(f) {
    try {
      return f();
    } catch (e) {
      if (e instanceof Reject) throw e.message;
      throw e;
    }
  }

  function applyOne(context, command) {
    const value = parsed("command", command);
    try {
      return encoded(machine.apply(context, value));
    } catch (e) {
      if (e instanceof Malformed) throw new Reject(`malformed command: ${e.message}`);
      throw e;
    }
  }

  return {
    apply(context, command) {
      return guarded(() => applyOne(context, command));
    },

    applyBatch(entries) {
      return entries.map((entry) => {
        try {
          return { tag: "ok", val: applyOne(entry.context, entry.command) };
        } catch (e) {
          if (e instanceof Reject) return { tag: "err", val: e.message };
          throw e;
        }
      });
    },

    // Exported only by waft:fsm@0.2.0 worlds; a 0.1.0 guest ignores it.
    fire(context, key, payload) {
      guarded(() => machine.fire(context, key, payload));
    },

    query(request) {
      return guarded(() => {
        const value = parsed("query", request);
        try {
          return encoded(machine.query(value));
        } catch (e) {
          if (e instanceof Malformed) throw new Reject(`malformed query: ${e.message}`);
          throw e;
        }
      });
    },

    snapshot() {
      return encoder.encode(stringify(machine.state(), true));
    },

    restore(bytes) {
      // Built aside and swapped in last: a refused snapshot leaves the state as it was.
      machine = guarded(() => {
        const value = parsed("snapshot", bytes);
        try {
          return Machine.fromState(value);
        } catch (e) {
          if (e instanceof Reject) throw new Reject(`malformed snapshot: ${e.message}`);
          throw e;
        }
      });
    },
  };
}
