// A JavaScript guest that misbehaves on command, to test that waft contains it (issue 36).
//
// State: names to values, changed by `set NAME VALUE`, read by the query `get NAME`.
// Misbehaviour, as commands and (but `set`) as queries:
// - `print`:       console.log (stdout)
// - `print-flush`: console.log and console.error (StarlingMonkey writes and flushes each)
// - `print-mb N`:  prints N MiB to stdout
// - `throw`:       throws an Error nobody catches (a trap; a thrown string is the WIT `err`)
// - `loop`:        loops until its fuel runs out
// - `bomb`:        allocates until its memory runs out
// - `recurse`:     recurses until the stack overflows
// - `huge N`:      replies with N bytes
// `snapshot` and `restore` (so every snapshot, rebase and restore) log to stdout and stderr.
const encoder = new TextEncoder();
const decoder = new TextDecoder();
let state = {};

function words(bytes) {
  return decoder.decode(bytes).split(/\s+/).filter((w) => w.length > 0);
}

// Runs a misbehaviour; returns its reply, or null when `w` names none.
function misbehave(w) {
  switch (w[0]) {
    case "print":
      console.log("hello from a guest");
      return "printed";
    case "print-flush":
      console.log("hello");
      console.error("hello on stderr");
      return "printed";
    case "print-mb": {
      const line = "x".repeat(1023);
      for (let i = 0; i < Number(w[1]) * 1024; i++) console.log(line);
      return "printed";
    }
    case "throw":
      throw new Error("deliberate uncaught exception");
    case "loop":
      for (;;) {}
    case "bomb": {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(4 << 20).fill(1));
    }
    case "recurse": {
      const down = (n) => down(n + 1) + 1;
      return String(down(0));
    }
    case "huge":
      return "x".repeat(Number(w[1]));
    default:
      return null;
  }
}

export const stateMachine = {
  apply(context, command) {
    const w = words(command);
    if (w.length === 3 && w[0] === "set") {
      state[w[1]] = w[2];
      return encoder.encode("OK");
    }
    const reply = misbehave(w);
    if (reply === null) throw `unknown command ${w.join(" ")}`;
    return encoder.encode(reply);
  },
  applyBatch(entries) {
    return entries.map((e) => {
      try {
        return { tag: "ok", val: this.apply(e.context, e.command) };
      } catch (x) {
        if (typeof x === "string") return { tag: "err", val: x };
        throw x;
      }
    });
  },
  query(request) {
    const w = words(request);
    if (w.length === 2 && w[0] === "get") {
      if (!Object.hasOwn(state, w[1])) throw `no ${w[1]}`;
      return encoder.encode(state[w[1]]);
    }
    const reply = misbehave(w);
    if (reply === null) throw `unknown query ${w.join(" ")}`;
    return encoder.encode(reply);
  },
  snapshot() {
    console.log("snapshot");
    console.error("snapshot, on stderr");
    return encoder.encode(JSON.stringify(state));
  },
  restore(snapshot) {
    state = snapshot.length ? JSON.parse(decoder.decode(snapshot)) : {};
    console.log("restored");
    console.error("restored, on stderr");
  },
};
