#!/usr/bin/env bash
# Watch fan-out and timer lag, waft vs etcd, same machine, same run: a 3-member etcd (Debian's
# etcd-server) and a 3-node waft serving etcd's API (`--etcd-listen`, the etcd-kv guest, whose
# leases are guest timers and whose watch events are guest events) on loopback.
#
#   waft bench-watch: 1,000 watchers (one stream each, spread over the members) on one prefix
#     while 4 writers put under it: events delivered per second, put-to-event latency.
#   waft bench-timers: 200 leases of 2 s granted over 5 s, one key each, idle and then with 16
#     writers loading the cluster: lag from each lease's due time to its key's delete event.
#
# Usage: scripts/bench-events.sh [WATCHERS] [SECONDS]
# Results: docs/benchmarks/events.jsonl (one JSON document per measurement) and a summary on
# stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
WATCHERS=${1:-1000}
SECS=${2:-10}

# shellcheck source=lib/bench-cluster.sh
. scripts/lib/bench-cluster.sh
bench_setup
trap stop_all EXIT
ETCD_KV=examples/guests/target/wasm32-wasip2/release/etcd_kv.wasm
ETCD_PIDS=()
WAFT_PIDS=()

waft_args() { echo "--etcd-listen 127.0.0.1:2479$1"; }
start_etcd "$DIR"
start_waft "$DIR" "$WAFT"
"$WAFT" --endpoint 127.0.0.1:17001 deploy "$ETCD_KV" --service etcd >/dev/null
for _ in $(seq 50); do ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23791 put warmup 1 >/dev/null 2>&1 && break; sleep 0.2; done

WAFT_ETCD=127.0.0.1:24791,127.0.0.1:24792,127.0.0.1:24793
REAL_ETCD=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
OUT=docs/benchmarks/events.jsonl
: >"$OUT"
echo "== watch fan-out: $WATCHERS watchers, 4 writers, ${SECS}s" >&2
"$WAFT" --output json bench-watch --etcd "$WAFT_ETCD" --compare-etcd "$REAL_ETCD" \
  --watchers "$WATCHERS" --writers 4 --duration "$SECS" | tee -a "$OUT" >&2
for load in 0 16; do
  echo "== timer lag: 200 leases of 2 s over 5 s, $load writers loading" >&2
  "$WAFT" --output json bench-timers --etcd "$WAFT_ETCD" --compare-etcd "$REAL_ETCD" \
    --timers 200 --ttl 2 --spread 5 --load "$load" | tee -a "$OUT" >&2
done
echo "wrote $OUT" >&2
