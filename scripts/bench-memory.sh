#!/usr/bin/env bash
# Memory of a `waft dev` cluster (3 nodes in one process) as services and versions are added
# (issue 23): prints the process RSS after each step: started (the Rust kv deployed), + the
# 18 MiB Python kv guest as a second service, then CYCLES × (deploy a new version of it,
# roll back).
#   GUEST_V2=FILE scripts/bench-memory.sh        (a second version of the Python guest)
#   BIN=other/waft GUEST_V2=FILE scripts/bench-memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/waft}
CYCLES=${CYCLES:-5}
GUEST=target/guests/kv-python.wasm
: "${GUEST_V2:?set GUEST_V2 to a second version of the Python kv guest}"
D=$(mktemp -d)
P=$((21000 + RANDOM % 20000))
$BIN dev --data-dir "$D" --base-port $P > "$D/dev.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$D"' EXIT
E=127.0.0.1:$P
for _ in $(seq 100); do $BIN --endpoint $E services 2>/dev/null | grep -q '^kv ' && break; sleep 0.3; done
rss() { awk '/VmRSS/ {printf "%d", $2 / 1024}' /proc/$pid/status; }
echo "started, Rust kv deployed: $(rss) MB"
$BIN --endpoint $E deploy $GUEST --service py >/dev/null
sleep 2
first=$(rss)
echo "+ the Python guest: $first MB"
for c in $(seq "$CYCLES"); do
  $BIN --endpoint $E deploy "$GUEST_V2" --service py >/dev/null
  $BIN --endpoint $E rollback --service py >/dev/null
  sleep 2
  echo "after $c deploy/rollback cycles: $(rss) MB"
done
echo "growth per cycle: $(( ($(rss) - first) / CYCLES )) MB; data directory $(du -sm "$D" | cut -f1) MB"
