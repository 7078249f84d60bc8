#!/usr/bin/env bash
# Memory per node, and where it goes (issue 23): 3 `waft node` processes; after each step,
# once RSS has settled (the allocator returns freed memory within seconds), prints per node
# (the mean of the three): RSS; the services' linear memory and the compiled code held in
# memory (both mapped by wasmtime, outside the heap); the heap the program has allocated, and
# in it the instance histories (base states and journals), the watch history and the log's
# entries; what the allocator says it holds beyond that (slack, pages not returned yet: an
# upper bound, it counts pages never touched); and the rest: RSS less linear memory, code and
# allocated heap (allocator slack, the binary, thread stacks). Linear memory is the size each
# guest asked for; pages it never touched, or shares unchanged with its module's copy-on-write
# image, are not in RSS, so a guest's real cost can be below it.
# Steps: idle; + the Rust kv guest; + the 18 MiB Python kv guest; + the 12 MiB JS kv guest;
# + a second service running the same Python module; CYCLES x (deploy a new version of the
# Python guest, roll back); WRITES puts to kv.
#   GUEST_V2=FILE scripts/bench-memory.sh       (a second version of the Python kv guest)
#   BIN=other/waft CYCLES=10 WRITES=1000000 GUEST_V2=FILE scripts/bench-memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cluster.sh
BIN=${BIN:-target/release/waft}
CYCLES=${CYCLES:-10}
WRITES=${WRITES:-1000000}
PY=target/guests/kv-python.wasm
JS=target/guests/kv-js.wasm
KV=target/guests/wasm32-wasip2/release/kv.wasm
: "${GUEST_V2:?set GUEST_V2 to a second version of the Python kv guest}"
[ -x "$BIN" ] || cargo build --release -p waft
for f in "$PY" "$JS" "$KV"; do
  [ -f "$f" ] || { echo "build the guests first: cargo test -p waft-testkit --no-run" >&2; exit 1; }
done
D=$(mktemp -d)
P=$((21000 + RANDOM % 20000))
pids=()
for i in 1 2 3; do
  $BIN node --id $i --listen 127.0.0.1:$((P+i)) --data-dir "$D/n$i" \
    --metrics-listen 127.0.0.1:$((P+10+i)) 2> "$D/n$i.log" & pids+=($!)
done
trap 'kill ${pids[*]} 2>/dev/null; rm -rf "$D"' EXIT
sleep 1
E=127.0.0.1:$((P+1))
form_cluster "$BIN" "$P"
rss_of() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$1/status"; }
total_rss() { local t=0; for p in "${pids[@]}"; do t=$((t + $(rss_of "$p"))); done; echo $t; }
# Waits until the three nodes' RSS stops falling: less than 1% lower than 10 s before (at
# most 90 s). jemalloc returns freed pages gradually over about 10 s.
settle() {
  local hist=() now
  for _ in $(seq 45); do
    sleep 2
    now=$(total_rss)
    hist+=("$now")
    local n=${#hist[@]}
    if [ "$n" -gt 5 ]; then
      local before=${hist[$((n - 6))]}
      [ $((before - now)) -lt $((before / 100)) ] && break
    fi
  done
}
report() {
  settle
  python3 - "$1" "$P" "${pids[@]}" <<'PY'
import re, sys, urllib.request
step, port, pids = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        m = re.match(r'%s(\{[^}]*\})? (\S+)$' % re.escape(name), line)
        if m:
            total += float(m.group(2))
    return total
rows = []
for i, pid in enumerate(pids, 1):
    rss = int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) * 1024
    text = urllib.request.urlopen(f"http://127.0.0.1:{port + 10 + i}/metrics").read().decode()
    linear = metric(text, "waft_service_memory_bytes")
    code = metric(text, "waft_modules_resident_code_bytes")
    allocated = metric(text, "waft_allocator_allocated_bytes")
    heap = metric(text, "waft_allocator_resident_bytes")
    history = metric(text, "waft_service_history_bytes")
    watch = metric(text, "waft_watch_history_bytes")
    log = metric(text, "waft_log_memory_bytes")
    rows.append((rss, linear, code, allocated, history, watch, log, heap - allocated,
                 rss - linear - code - allocated))
mean = [sum(r[k] for r in rows) / len(rows) / 2**20 for k in range(9)]
print("| %s | %.0f | %.0f | %.0f | %.0f | %.1f | %.1f | %.1f | %.0f | %.0f |" % (step, *mean))
PY
}
echo "| step | RSS MB | linear memory | compiled code | heap allocated | of it: instance histories | watch history | log | allocator held (at most) | rest |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
report "idle"
$BIN --endpoint $E deploy $KV --service kv >/dev/null
report "+ Rust kv"
$BIN --endpoint $E deploy $PY --service py >/dev/null
report "+ Python kv"
first=$(total_rss)
$BIN --endpoint $E deploy $JS --service js >/dev/null
report "+ JS kv"
$BIN --endpoint $E deploy $PY --service py2 >/dev/null
report "+ a second service running the same Python module"
with_js=$(total_rss)
for c in $(seq "$CYCLES"); do
  $BIN --endpoint $E deploy "$GUEST_V2" --service py >/dev/null
  $BIN --endpoint $E rollback --service py >/dev/null
done
report "after $CYCLES deploy/rollback cycles of the Python guest"
after=$(total_rss)
$BIN --endpoint $E bench --clients 64 --count "$WRITES" --service kv >/dev/null
report "after $WRITES writes"
echo
echo "after the cycles / before them: $(python3 -c "print('%.2f' % ($after / $with_js))")"
echo "data directories: $(du -sm "$D" | cut -f1) MB"
