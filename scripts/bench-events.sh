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

command -v etcd >/dev/null || apt-get install -y etcd-server etcd-client >/dev/null
cargo build --release --quiet
rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
cargo build --release --quiet --target wasm32-wasip2 --manifest-path examples/guests/Cargo.toml
WAFT=target/release/waft
ETCD_KV=examples/guests/target/wasm32-wasip2/release/etcd_kv.wasm

DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

CLUSTER="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$DIR/e$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token waft-bench \
    >"$DIR/etcd$i.log" 2>&1 &
  PIDS+=($!)
done
"$WAFT" node --id 1 --listen 127.0.0.1:17001 --etcd-listen 127.0.0.1:24791 --data-dir "$DIR/w1" 2>"$DIR/waft1.log" &
PIDS+=($!)
for _ in $(seq 50); do "$WAFT" --endpoint 127.0.0.1:17001 cluster status >/dev/null 2>&1 && break; sleep 0.2; done
"$WAFT" --endpoint 127.0.0.1:17001 cluster init >/dev/null
for i in 2 3; do
  "$WAFT" node --id $i --listen 127.0.0.1:1700$i --etcd-listen 127.0.0.1:2479$i --data-dir "$DIR/w$i" \
    --join 127.0.0.1:17001 2>"$DIR/waft$i.log" &
  PIDS+=($!)
done
for _ in $(seq 100); do
  voters=$("$WAFT" --endpoint 127.0.0.1:17001 --output json cluster status 2>/dev/null | grep -o '"voter":true' | wc -l || true)
  [ "$voters" = 3 ] && break
  sleep 0.2
done
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
