#!/usr/bin/env bash
# Puts per second of the kv guest in Rust, Python, JavaScript and C on one 3-node cluster, same
# run (issue 19): each runs as a service of its own and `waft bench` loads one at a time
# (64-byte puts, clients spread, one session per node), then prints each against the Rust
# guest, with the CPU the three nodes spent per put.
#   scripts/bench-languages.sh [SECONDS_PER_POINT] [CLIENTS...]
#   BIN=other/waft scripts/bench-languages.sh 8 16 64
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cluster.sh
SECS=${1:-8}
shift || true
CLIENTS=${*:-16 64}
BIN=${BIN:-target/release/waft}
[ -x "$BIN" ] || cargo build --release -p waft
declare -A GUEST=(
  [rust]=target/guests/wasm32-wasip2/release/kv.wasm
  [python]=target/guests/kv-python.wasm
  [js]=target/guests/kv-js.wasm
  [c]=target/guests/kv-c.wasm
)
for f in "${GUEST[@]}"; do
  [ -f "$f" ] || { echo "build the guests first: cargo test -p waft-testkit --no-run ($f)" >&2; exit 1; }
done
D=$(mktemp -d)
P=$((21000 + RANDOM % 20000))
pids=()
for i in 1 2 3; do
  $BIN node --id $i --listen 127.0.0.1:$((P+i)) --data-dir "$D/n$i" 2> "$D/n$i.log" & pids+=($!)
done
trap 'kill ${pids[*]} 2>/dev/null; rm -rf "$D"' EXIT
sleep 1
form_cluster "$BIN" "$P"
E=127.0.0.1:$((P+1)),127.0.0.1:$((P+2)),127.0.0.1:$((P+3))
for lang in rust python js c; do
  echo "deploying the $lang kv guest" >&2
  $BIN --endpoint 127.0.0.1:$((P+1)) deploy "${GUEST[$lang]}" --service "kv-$lang" >/dev/null
done
cpu() {
  local t=0 p
  for p in "${pids[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
echo "| clients | guest | puts/s | vs Rust | p50 ms | p99 ms | CPU per put (3 nodes) |"
echo "|---:|---|---:|---:|---:|---:|---:|"
for c in $CLIENTS; do
  rust=
  for lang in rust python js c; do
    c0=$(cpu)
    out=$($BIN --output json bench --endpoints "$E" --service "kv-$lang" --clients "$c" \
      --duration "$SECS" --warmup 1)
    c1=$(cpu)
    line=$(echo "$out" | python3 -c "
import json, sys
r = json.load(sys.stdin)['results'][0]
tck = $(getconf CLK_TCK)
cpu = ($c1 - $c0) / tck * $SECS / ($SECS + 1)
print(r['ops_per_sec'], r['latency_ms']['p50'], r['latency_ms']['p99'], cpu / max(r['ops'], 1) * 1e6, r['errors'])
")
    read -r ops p50 p99 per errors <<<"$line"
    [ -n "$rust" ] || rust=$ops
    python3 -c "print('| $c | $lang | %.0f | %.2fx | %.2f | %.2f | %.0f us |%s' % ($ops, $ops / $rust, $p50, $p99, $per, '' if $errors == 0 else ' $errors errors'))"
  done
done
