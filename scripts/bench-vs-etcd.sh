#!/usr/bin/env bash
# waft vs etcd, same machine, same workload: a 3-member etcd (Debian's etcd-server, fsync on,
# as shipped) and a 3-node waft (redb commits fsync'd) on loopback; `waft bench` loads both with
# 64-byte puts from 1, 16, 64 and 256 clients and writes a table and a plot to docs/benchmarks/.
#
# Usage: scripts/bench-vs-etcd.sh [SECONDS_PER_POINT] [CLIENTS...]
# WAFT_BENCH_TO_LEADER=1 sends waft's requests to its leader (a leader-aware client) instead of
# spreading them over the three nodes like etcd's; results then go to vs-etcd-to-leader.*.
# WAFT_LOG_ENGINE=redb runs waft's nodes on the redb log engine instead of the default WAL
# (results: vs-etcd[-to-leader]-redb.*).
# WAFT_BENCH_BATCH=N sends N writes per request: a SubmitBatch to waft, a Txn of N puts to etcd
# (results: vs-etcd[...]-batchN.*).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
shift || true
CLIENTS=${*:-1 16 64 256}

if ! command -v etcd >/dev/null; then
  echo "etcd is not installed; installing Debian's etcd-server (needs root)" >&2
  apt-get install -y etcd-server etcd-client >/dev/null
fi
cargo build --release --quiet
rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
cargo build --release --quiet --target wasm32-wasip2 --manifest-path examples/guests/Cargo.toml
WAFT=target/release/waft
KV=examples/guests/target/wasm32-wasip2/release/kv.wasm

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

"$WAFT" node --id 1 --listen 127.0.0.1:17001 --data-dir "$DIR/w1" 2>"$DIR/waft1.log" &
PIDS+=($!)
for _ in $(seq 50); do "$WAFT" --endpoint 127.0.0.1:17001 cluster status >/dev/null 2>&1 && break; sleep 0.2; done
"$WAFT" --endpoint 127.0.0.1:17001 cluster init >/dev/null
for i in 2 3; do
  "$WAFT" node --id $i --listen 127.0.0.1:1700$i --data-dir "$DIR/w$i" --join 127.0.0.1:17001 2>"$DIR/waft$i.log" &
  PIDS+=($!)
done
for _ in $(seq 100); do
  voters=$("$WAFT" --endpoint 127.0.0.1:17001 --output json cluster status 2>/dev/null | grep -o '"voter":true' | wc -l || true)
  [ "$voters" = 3 ] && break
  sleep 0.2
done
"$WAFT" --endpoint 127.0.0.1:17001 deploy "$KV" --service kv >/dev/null
for _ in $(seq 50); do ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23791 put warmup 1 >/dev/null 2>&1 && break; sleep 0.2; done

NAME=vs-etcd
ROUTE=()
if [ -n "${WAFT_BENCH_TO_LEADER:-}" ]; then
  NAME=$NAME-to-leader
  ROUTE=(--to-leader)
fi
# WAFT_LOG_ENGINE (read by `waft node`) picks the log engine; the WAL is the default.
if [ "${WAFT_LOG_ENGINE:-wal}" = redb ]; then
  NAME=$NAME-redb
fi
if [ "${WAFT_BENCH_BATCH:-1}" != 1 ]; then
  NAME=$NAME-batch$WAFT_BENCH_BATCH
  ROUTE+=(--batch "$WAFT_BENCH_BATCH")
fi
OUT=docs/benchmarks/$NAME.jsonl
: >"$OUT"
for c in $CLIENTS; do
  echo "== $c clients" >&2
  "$WAFT" --output json bench --endpoints 127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003 \
    --compare-etcd 127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793 \
    --clients "$c" --duration "$SECS" --warmup 2 --value-size 64 "${ROUTE[@]}" >>"$OUT"
  tail -n1 "$OUT" | python3 scripts/bench_report.py --summary
done
python3 scripts/bench_report.py "$OUT" "docs/benchmarks/$NAME.md" "docs/benchmarks/$NAME.svg"
echo "wrote docs/benchmarks/$NAME.{jsonl,md,svg}" >&2
