#!/usr/bin/env bash
# The inline apply path, A/B in one run (issue 36): a 3-node cluster whose nodes apply cheap
# batches on the async worker that receives them (inline, the default) against one whose nodes
# hand every batch to a blocking thread (`--inline-apply false`). Rounds alternate A, B, A, B
# on the same machine, each on a fresh cluster; each point is `waft bench` (64-byte puts,
# sessions, clients spread over the nodes) on the Rust kv guest and the Python one. Prints
# puts/s, p50/p99 and CPU per put of both, and blocking's against inline's.
#   scripts/bench-inline-apply.sh [SECONDS_PER_POINT] [ROUNDS] [CLIENTS...]
#   BIN=other/waft scripts/bench-inline-apply.sh 8 2 16 64
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cluster.sh
SECS=${1:-8}
ROUNDS=${2:-2}
shift 2 || true
CLIENTS=${*:-16 64}
BIN=${BIN:-target/release/waft}
[ -x "$BIN" ] || cargo build --release -p waft
declare -A GUEST=(
  [rust]=target/guests/wasm32-wasip2/release/kv.wasm
  [python]=target/guests/kv-python.wasm
)
for f in "${GUEST[@]}"; do
  [ -f "$f" ] || { echo "build the guests first: cargo test -p waft-testkit --no-run ($f)" >&2; exit 1; }
done
D=$(mktemp -d)
pids=()
trap 'kill ${pids[*]} 2>/dev/null; rm -rf "$D"' EXIT
RESULTS=$D/results.txt

cpu() {
  local t=0 p
  for p in "${pids[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}

# One round: a fresh cluster with --inline-apply $1, every guest and client count.
round() {
  local inline=$1 r=$2 P i lang c
  P=$((21000 + RANDOM % 20000))
  pids=()
  for i in 1 2 3; do
    $BIN node --id $i --listen 127.0.0.1:$((P+i)) --data-dir "$D/$r-$inline/n$i" \
      --inline-apply "$inline" 2> "$D/$r-$inline-n$i.log" & pids+=($!)
  done
  sleep 1
  form_cluster "$BIN" "$P"
  local E=127.0.0.1:$((P+1)),127.0.0.1:$((P+2)),127.0.0.1:$((P+3))
  for lang in rust python; do
    $BIN --endpoint 127.0.0.1:$((P+1)) deploy "${GUEST[$lang]}" --service "kv-$lang" >/dev/null
  done
  for lang in rust python; do
    for c in $CLIENTS; do
      local c0 c1 out
      c0=$(cpu)
      out=$($BIN --output json bench --endpoints "$E" --service "kv-$lang" --clients "$c" \
        --duration "$SECS" --warmup 1)
      c1=$(cpu)
      echo "$out" | python3 -c "
import json, sys
r = json.load(sys.stdin)['results'][0]
cpu = ($c1 - $c0) / $(getconf CLK_TCK) * $SECS / ($SECS + 1)
print('$inline', '$lang', $c, r['ops_per_sec'], r['latency_ms']['p50'], r['latency_ms']['p99'],
      cpu / max(r['ops'], 1) * 1e6, r['errors'])
" >> "$RESULTS"
    done
  done
  kill "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}

for r in $(seq "$ROUNDS"); do
  for inline in true false; do
    echo "round $r: --inline-apply $inline" >&2
    round "$inline" "$r"
  done
done

python3 - "$RESULTS" <<'PY'
import sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    inline, lang, c, ops, p50, p99, per, errors = line.split()
    rows[(lang, int(c), inline)].append((float(ops), float(p50), float(p99), float(per), int(errors)))
def mean(xs): return sum(xs) / len(xs)
print("| guest | clients | inline puts/s | blocking puts/s | blocking vs inline | inline p50/p99 ms | blocking p50/p99 ms | CPU per put, inline | blocking |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for lang, c in sorted({(k[0], k[1]) for k in rows}, key=lambda k: (k[0] != "rust", k[1])):
    a, b = rows[(lang, c, "true")], rows[(lang, c, "false")]
    ao, bo = mean([x[0] for x in a]), mean([x[0] for x in b])
    errors = sum(x[4] for x in a + b)
    print(f"| {lang} | {c} | {ao:.0f} | {bo:.0f} | {bo / ao:.2f}x "
          f"| {mean([x[1] for x in a]):.2f}/{mean([x[2] for x in a]):.2f} "
          f"| {mean([x[1] for x in b]):.2f}/{mean([x[2] for x in b]):.2f} "
          f"| {mean([x[3] for x in a]):.0f} us | {mean([x[3] for x in b]):.0f} us |"
          + (f" {errors} errors" if errors else ""))
PY
