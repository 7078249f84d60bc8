#!/usr/bin/env bash
# A big snapshot sent to a new learner under write load (issue 18): 3 `waft node` processes
# with the kv guest holding STATE_MIB MiB (1 KiB values), 64 clients writing 64-byte puts to
# another service through `waft bench`; a baseline window, then the same load while a 4th
# node joins as a learner, which needs the snapshot (the log before it is purged). Prints, per
# run: how long the learner took to catch up, elections, failed writes, p99 of the baseline and
# of the window, and their ratio.
#   scripts/bench-snapshot-under-load.sh [RUNS]       (STATE_MIB=256 CLIENTS=64 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cluster.sh
RUNS=${1:-1}
CLIENTS=${CLIENTS:-64}
STATE_MIB=${STATE_MIB:-256}
BIN=${BIN:-target/release/waft}
KV=target/guests/wasm32-wasip2/release/kv.wasm
[ -x "$BIN" ] || cargo build --release -p waft
[ -f "$KV" ] || { echo "build the guests first: cargo test -p waft-testkit --no-run" >&2; exit 1; }
json() { python3 -c "import json,sys;d=json.load(sys.stdin);print($1)"; }
for run in $(seq "$RUNS"); do
  D=$(mktemp -d)
  P=$((21000 + RANDOM % 20000))
  pids=()
  for i in 1 2 3 4; do
    $BIN --log "${NODE_LOG:-warn}" node --id $i --listen 127.0.0.1:$((P+i)) --data-dir "$D/n$i" \
      --snapshot-every 20000 --keep-after-snapshot 1000 2> "$D/n$i.log" & pids+=($!)
  done
  trap 'kill ${pids[*]} 2>/dev/null' EXIT
  sleep 1
  E=127.0.0.1:$((P+1))
  form_cluster "$BIN" "$P"
  # The big state lives in `big`; the load goes to `kv`, so the two do not share a key.
  $BIN --endpoint $E deploy $KV --service big --max-memory-mib $((STATE_MIB * 4 + 256)) >/dev/null
  $BIN --endpoint $E deploy $KV --service kv >/dev/null
  python3 -c "
import sys
v = 'x' * 1000
for i in range($STATE_MIB * 1024):
    sys.stdout.write(f'put k{i:07d} {v}\n')
" > "$D/fill.txt"
  $BIN --endpoint $E submit --service big --lines @"$D/fill.txt" >/dev/null
  rm "$D/fill.txt"
  $BIN --endpoint $E cluster snapshot >/dev/null
  base=$($BIN --endpoint $E --output json bench --clients $CLIENTS --duration 10)
  term0=$($BIN --endpoint $E --output json cluster status | json 'd["term"]')
  $BIN --endpoint $E --output json bench --clients $CLIENTS --duration 60 > "$D/load.json" &
  bench=$!
  sleep 5
  start=$(date +%s.%N)
  $BIN --endpoint $E cluster add-learner 4 127.0.0.1:$((P+4)) >/dev/null
  took=$(echo "$(date +%s.%N) - $start" | bc)
  wait $bench
  term1=$($BIN --endpoint $E --output json cluster status | json 'd["term"]')
  snap=$(stat -c %s "$D/n1/snapshots/current.snap")
  b99=$(echo "$base" | json 'd["results"][0]["latency_ms"]["p99"]')
  l99=$(json 'd["results"][0]["latency_ms"]["p99"]' < "$D/load.json")
  lmax=$(json 'd["results"][0]["latency_ms"]["max"]' < "$D/load.json")
  bops=$(echo "$base" | json 'd["results"][0]["ops_per_sec"]')
  lops=$(json 'd["results"][0]["ops_per_sec"]' < "$D/load.json")
  errs=$(json 'd["results"][0]["errors"]' < "$D/load.json")
  echo "run $run: snapshot $((snap / 1048576)) MiB; learner caught up in $(printf %.1f "$took") s; elections $((term1 - term0)); failed writes $errs; puts/s baseline $bops, during $lops; p99 baseline $b99 ms, during $l99 ms (max $lmax), ratio $(echo "scale=2; $l99 / $b99" | bc)"
  kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $D"; else rm -rf "$D"; fi; trap - EXIT
done
