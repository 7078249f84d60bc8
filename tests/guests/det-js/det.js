// A JavaScript guest that draws on every source of nondeterminism JavaScript offers: waft must
// make each deterministic per entry without help from the guest (`waft exec --verify` finds it
// deterministic; replicas agree).
const encoder = new TextEncoder();
const decoder = new TextDecoder();
let state = [];

function observe(tag) {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return {
    tag,
    math: Math.random(),
    crypto: Array.from(bytes).join(","),
    now: Date.now(),
    date: new Date().toISOString(),
    perf: performance.now(),
  };
}

export const stateMachine = {
  apply(context, command) {
    const seen = observe(decoder.decode(command));
    state.push(seen);
    return encoder.encode(JSON.stringify(seen));
  },
  applyBatch(entries) {
    return entries.map((e) => ({ tag: "ok", val: this.apply(e.context, e.command) }));
  },
  query(request) {
    if (decoder.decode(request) === "observe") {
      return encoder.encode(JSON.stringify(observe("query")));
    }
    return encoder.encode(JSON.stringify(state));
  },
  snapshot() {
    return encoder.encode(JSON.stringify(state));
  },
  restore(snapshot) {
    state = snapshot.length ? JSON.parse(decoder.decode(snapshot)) : [];
  },
};
