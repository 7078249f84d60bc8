// A replicated key-value store in JavaScript: the same commands, replies and snapshot bytes as
// the Rust `kv` guest, so either can replace the other with `waft deploy` (hot-swap keeps state).
//
// Build (ComponentizeJS from npm):
//
//   npm install --prefix examples/guests/kv-js       # the versions in package-lock.json
//   npm run build --prefix examples/guests/kv-js     # -> examples/guests/kv-js/kv-js.wasm
//
// (`just guest-js` does both, writing target/guests/kv-js.wasm.)
//
// Commands: put KEY VALUE | get KEY | del KEY | cas KEY EXPECTED NEW | scan PREFIX
// Queries:  get KEY | scan [PREFIX]
//
// Determinism: keys live in a Map, but every ordered output (scan, snapshot) is sorted by code
// point (the UTF-8 byte order of the Rust guest's BTreeMap), never by insertion order or by
// JavaScript's default UTF-16 sort. The component is built with `--disable http`; clocks and
// randomness come from waft's deterministic WASI and this guest does not read them.

import { log } from "waft:fsm/host@0.1.0";

const MAGIC = [0x57, 0x4b, 0x56, 0x31]; // "WKV1"
const encoder = new TextEncoder();
const strict = new TextDecoder("utf-8", { fatal: true });

// A rejection: the string goes back to the client and the state stays as it was.
class Rejected {
  constructor(message) {
    this.message = message;
  }
}

function reject(message) {
  throw new Rejected(message);
}

// Compares by Unicode code point, which is UTF-8 byte order.
function byCodePoint(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; ) {
    const x = a.codePointAt(i);
    const y = b.codePointAt(i);
    if (x !== y) return x < y ? -1 : 1;
    i += x > 0xffff ? 2 : 1;
  }
  return a.length - b.length;
}

const ESCAPES = { "\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0" };

// Quotes text the way Rust's `{:?}` does (for the ASCII range), so errors match the Rust kv.
function debug(text) {
  let out = '"';
  for (const ch of text) {
    const code = ch.codePointAt(0);
    if (ESCAPES[ch] !== undefined) out += ESCAPES[ch];
    else if (code < 0x20 || code === 0x7f) out += `\\u{${code.toString(16)}}`;
    else out += ch;
  }
  return out + '"';
}

// Splits off the first space-separated word (after leading whitespace).
function word(text) {
  text = text.trimStart();
  const at = text.indexOf(" ");
  return at < 0 ? [text, ""] : [text.slice(0, at), text.slice(at + 1)];
}

function need(what, value, usage) {
  if (value === "") reject(`missing ${what}; usage: ${usage}`);
  return value;
}

function utf8(bytes, what) {
  try {
    return strict.decode(bytes);
  } catch {
    reject(`${what} is not UTF-8`);
  }
}

let entries = new Map();

function get(key) {
  key = need("KEY", key.trim(), "get KEY");
  if (!entries.has(key)) reject(`key not found: ${key}`);
  return encoder.encode(entries.get(key));
}

function scan(prefix) {
  prefix = prefix.trim();
  const keys = [...entries.keys()].filter((k) => k.startsWith(prefix)).sort(byCodePoint);
  return encoder.encode(keys.map((k) => `${k} ${entries.get(k)}\n`).join(""));
}

function applyCommand(command) {
  const [verb, rest] = word(utf8(command, "command"));
  switch (verb) {
    case "put": {
      const [key, value] = word(rest);
      entries.set(need("KEY", key, "put KEY VALUE"), value);
      return encoder.encode("OK");
    }
    case "get":
      return get(rest);
    case "del": {
      const key = need("KEY", rest.trim(), "del KEY");
      if (!entries.delete(key)) reject(`key not found: ${key}`);
      return encoder.encode("OK");
    }
    case "cas": {
      const usage = "cas KEY EXPECTED NEW";
      const [k, more] = word(rest);
      const [e, next] = word(more);
      const key = need("KEY", k, usage);
      const expected = need("EXPECTED", e, usage);
      if (!entries.has(key)) reject(`key not found: ${key}`);
      const current = entries.get(key);
      if (current !== expected) reject(`compare failed: ${key} is ${current}`);
      entries.set(key, next);
      return encoder.encode("OK");
    }
    case "scan":
      return scan(rest);
    case "":
      return reject("empty command; try: put KEY VALUE");
    default:
      return reject(`unknown command ${debug(verb)}; expected put, get, del, cas or scan`);
  }
}

// Runs `f`, turning a rejection into the WIT `err` (a thrown string); anything else traps.
function guarded(f) {
  try {
    return f();
  } catch (e) {
    if (e instanceof Rejected) throw e.message;
    throw e;
  }
}

function snapshotBytes() {
  const keys = [...entries.keys()].sort(byCodePoint);
  const fields = [];
  let size = 12;
  for (const k of keys) {
    for (const field of [encoder.encode(k), encoder.encode(entries.get(k))]) {
      fields.push(field);
      size += 4 + field.length;
    }
  }
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  view.setBigUint64(4, BigInt(keys.length), true);
  let at = 12;
  for (const field of fields) {
    view.setUint32(at, field.length, true);
    out.set(field, at + 4);
    at += 4 + field.length;
  }
  return out;
}

function parseSnapshot(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  const take = (n) => {
    if (bytes.length - at < n) reject("kv snapshot is truncated");
    at += n;
    return at - n;
  };
  const string = () => {
    const len = view.getUint32(take(4), true);
    const start = take(len);
    try {
      return strict.decode(bytes.subarray(start, start + len));
    } catch {
      reject("kv snapshot holds invalid UTF-8");
    }
  };
  take(4);
  if (MAGIC.some((b, i) => bytes[i] !== b)) reject("not a kv snapshot (bad magic)");
  const count = view.getBigUint64(take(8), true);
  const restored = new Map();
  for (let i = 0n; i < count; i++) {
    const key = string();
    restored.set(key, string());
  }
  if (at !== bytes.length) reject("kv snapshot has trailing bytes");
  return restored;
}

export const stateMachine = {
  apply(_context, command) {
    return guarded(() => applyCommand(command));
  },

  applyBatch(batch) {
    return batch.map((entry) => {
      try {
        return { tag: "ok", val: applyCommand(entry.command) };
      } catch (e) {
        if (e instanceof Rejected) return { tag: "err", val: e.message };
        throw e;
      }
    });
  },

  query(request) {
    return guarded(() => {
      const [verb, rest] = word(utf8(request, "query"));
      if (verb === "get") return get(rest);
      if (verb === "scan") return scan(rest);
      return reject(`unknown query ${debug(verb)}; queries are get KEY and scan [PREFIX]`);
    });
  },

  snapshot() {
    return snapshotBytes();
  },

  restore(snapshot) {
    // A refused snapshot throws before `entries` is replaced: the old state stays.
    entries = guarded(() => parseSnapshot(snapshot));
    log("debug", `restored ${entries.size} keys`);
  },
};
