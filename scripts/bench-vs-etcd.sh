#!/usr/bin/env bash
# waft vs etcd, same machine, same workload: a 3-member etcd (Debian's etcd-server, fsync on,
# as shipped) and a 3-node waft (WAL, fsync'd per group commit) on loopback; `waft bench` loads both with
# 64-byte puts from 1, 16, 64 and 256 clients and writes a table and a plot to docs/benchmarks/.
#
# Usage: scripts/bench-vs-etcd.sh [SECONDS_PER_POINT] [CLIENTS...]
# WAFT_BENCH_TO_LEADER=1 sends waft's requests to its leader (a leader-aware client) instead of
# spreading them over the three nodes like etcd's; results then go to vs-etcd-to-leader.*.
# WAFT_LOG_ENGINE=redb runs waft's nodes on the redb log engine instead of the default WAL
# (results: vs-etcd[-to-leader]-redb.*).
# WAFT_BENCH_BATCH=N sends N writes per request: a SubmitBatch to waft, a Txn of N puts to etcd
# (results: vs-etcd[...]-batchN.*).
# WAFT_BENCH_CPU=0.5 gives every waft node and every etcd member its own CPU quota of that many
# cores (cgroup v1 `cpu`, cfs_quota_us), as if each ran on a machine of its own (results:
# vs-etcd[...]-cpu0.5.*).
# WAFT_BENCH_API=unary sends each waft request as its own unary call instead of over the
# connection's Session stream (waft bench's default; results: vs-etcd[...]-unary.*).
# WAFT_BENCH_CONNECTIONS=N: HTTP/2 connections per system (default: one per client, up to 64).
# WAFT_BENCH_REPEAT=N runs each point's waft/etcd pair N times in a row and keeps the pair with
# the median ratio (CPU per put counts all of them): the machine's noise moves single runs by
# ±10%.
# WAFT_BIN=PATH runs that waft build instead of building target/release/waft: run the script
# once per build, alternating, for a same-run A/B of two builds against the same etcd.
# Every point also prints the CPU time (user and system, from /proc) each system's three
# processes spent per put, and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
REPEAT=${WAFT_BENCH_REPEAT:-1}
shift || true
CLIENTS=${*:-1 16 64 256}

# shellcheck source=lib/bench-cluster.sh
. scripts/lib/bench-cluster.sh
bench_setup
KV=examples/guests/target/wasm32-wasip2/release/kv.wasm

CPU=${WAFT_BENCH_CPU:-}
CG=/sys/fs/cgroup/cpu/waft-bench-$$
# Puts process $2 in a cgroup of its own named $1 with a quota of $CPU cores.
confine() {
  [ -n "$CPU" ] || return 0
  mkdir -p "$CG/$1"
  echo 100000 >"$CG/$1/cpu.cfs_period_us"
  local quota
  quota=$(python3 -c "print(int($CPU * 100000))")
  echo "$quota" >"$CG/$1/cpu.cfs_quota_us"
  echo "$2" >"$CG/$1/cgroup.procs"
}
uncage() {
  [ -n "$CPU" ] && [ -d "$CG" ] || return 0
  for d in "$CG"/*/; do rmdir "$d" 2>/dev/null || true; done
  rmdir "$CG" 2>/dev/null || true
}
trap 'stop_all; uncage' EXIT
# User + system CPU seconds of the given processes (all their threads); with FIELD=14 user
# only, FIELD=15 system only.
cpu_seconds() {
  local t=0 p
  for p in "$@"; do
    t=$((t + $(awk -v f="${FIELD:-0}" '{print f ? $f : $14 + $15}' "/proc/$p/stat")))
  done
  python3 -c "print($t / $(getconf CLK_TCK))"
}

ETCD_PIDS=()
WAFT_PIDS=()
start_etcd "$DIR"
start_waft "$DIR" "$WAFT"
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
if [ "${WAFT_BENCH_API:-session}" != session ]; then
  NAME=$NAME-$WAFT_BENCH_API
fi
ROUTE+=(--api "${WAFT_BENCH_API:-session}")
if [ -n "${WAFT_BENCH_CONNECTIONS:-}" ]; then
  NAME=$NAME-conn$WAFT_BENCH_CONNECTIONS
  ROUTE+=(--connections "$WAFT_BENCH_CONNECTIONS")
fi
if [ -n "$CPU" ]; then
  NAME=$NAME-cpu$CPU
fi
WARMUP=2
OUT=docs/benchmarks/$NAME.jsonl
: >"$OUT"
# What each system burns with no load at all (heartbeats, timers), over SECS.
w0=$(cpu_seconds "${WAFT_PIDS[@]}")
e0=$(cpu_seconds "${ETCD_PIDS[@]}")
sleep "$SECS"
python3 -c "print('idle CPU (3 processes): waft %.1f%%, etcd %.1f%% of a core' % (($(cpu_seconds "${WAFT_PIDS[@]}") - $w0) / $SECS * 100, ($(cpu_seconds "${ETCD_PIDS[@]}") - $e0) / $SECS * 100))" >&2
for c in $CLIENTS; do
  echo "== $c clients" >&2
  waft_cpu=$(cpu_seconds "${WAFT_PIDS[@]}")
  etcd_cpu=$(cpu_seconds "${ETCD_PIDS[@]}")
  waft_sys=$(FIELD=15 cpu_seconds "${WAFT_PIDS[@]}")
  etcd_sys=$(FIELD=15 cpu_seconds "${ETCD_PIDS[@]}")
  : >"$DIR/runs.jsonl"
  for _ in $(seq "$REPEAT"); do
    "$WAFT" --output json bench --endpoints 127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003 \
      --compare-etcd 127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793 \
      --clients "$c" --duration "$SECS" --warmup "$WARMUP" --value-size 64 "${ROUTE[@]}" >>"$DIR/runs.jsonl"
  done
  # The pair with the median throughput ratio stands for the point; every ratio is printed.
  python3 -c "
import json, sys
runs = [json.loads(l) for l in open('$DIR/runs.jsonl') if l.strip()]
ratios = [r['ratio']['throughput'] for r in runs]
if len(runs) > 1:
    print('  ratios of the %d pairs: %s' % (len(runs), ', '.join('%.2f' % x for x in ratios)), file=sys.stderr)
median = sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]
print(json.dumps(runs[median]))
" >>"$OUT"
  tail -n1 "$OUT" | python3 scripts/bench_report.py --summary
  # CPU per put: each system is loaded in turn (its warmup, then SECS), idle otherwise; the
  # warmup's share of the CPU is taken out at the measured rate.
  python3 -c "
import json, sys
r = {}
for line in open('$DIR/runs.jsonl'):
    if line.strip():
        for x in json.loads(line)['results']:
            r.setdefault(x['target'], {'ops': 0})['ops'] += x['ops']
spent = {'waft': $(cpu_seconds "${WAFT_PIDS[@]}") - $waft_cpu, 'etcd': $(cpu_seconds "${ETCD_PIDS[@]}") - $etcd_cpu}
kernel = {'waft': $(FIELD=15 cpu_seconds "${WAFT_PIDS[@]}") - $waft_sys, 'etcd': $(FIELD=15 cpu_seconds "${ETCD_PIDS[@]}") - $etcd_sys}
per = {t: spent[t] * $SECS / ($SECS + $WARMUP) / r[t]['ops'] * 1e6 for t in spent}
print('CPU per put (3 processes): waft %.0f us, etcd %.0f us, waft/etcd %.2f; in the kernel: waft %.0f%%, etcd %.0f%%' % (per['waft'], per['etcd'], per['waft'] / per['etcd'], kernel['waft'] / spent['waft'] * 100, kernel['etcd'] / spent['etcd'] * 100))
" >&2
done
python3 scripts/bench_report.py "$OUT" "docs/benchmarks/$NAME.md" "docs/benchmarks/$NAME.svg"
echo "wrote docs/benchmarks/$NAME.{jsonl,md,svg}" >&2
