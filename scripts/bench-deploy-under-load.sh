#!/usr/bin/env bash
# Deploying a large guest under write load (issue 18): 3 `waft node` processes, 64 clients
# writing through `waft bench`; first a baseline window with no deploy, then the same load
# while the 18 MiB Python kv guest is deployed. Prints, per run: elections (term change), failed
# client writes, heartbeats that timed out (leader's log), p99/max write latency of the
# baseline and of the deploy window, and their ratio.
#   scripts/bench-deploy-under-load.sh [RUNS]     (release binary and guests built first)
#   CLIENTS=0 scripts/bench-deploy-under-load.sh 20   (an idle cluster: elections, deploy
#   times of a first version and of a second one with the same module, how much the logs grow;
#   GUEST_V2=FILE also times the deploy of a new version of the guest)
#   TLS=1: the nodes talk mutual TLS (certificates from `waft certs`), clients TLS;
#   SHARE=1: TLS=1 and `--share-compiled` (members load the leader's compiled code)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cluster.sh
RUNS=${1:-3}
CLIENTS=${CLIENTS:-64}
BIN=${BIN:-target/release/waft}
GUEST=${GUEST:-target/guests/kv-python.wasm}
KV=target/guests/wasm32-wasip2/release/kv.wasm
[ -x "$BIN" ] || cargo build --release -p waft
[ -f "$GUEST" ] || { echo "build the guests first: cargo test -p waft-testkit --no-run" >&2; exit 1; }
logs() { cat "$1"/n*/log.* | wc -c; }
# Node 1's metrics (it is the leader unless an election moved it; elections are counted).
scrape() { curl -s "http://127.0.0.1:$((P+10))/metrics" > "$1"; }
# p99 of the leader's heartbeat round trips between two scrapes, ms (from the histogram:
# the upper bound of the bucket the 99th percentile falls in, buckets 1.5x apart).
rtt99() {
  python3 - "$1" "$2" <<'PY'
import re, sys
def buckets(path):
    out = {}
    for line in open(path):
        m = re.match(r'waft_peer_round_trip_seconds_bucket\{kind="heartbeat",le="([^"]+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out
a, b = buckets(sys.argv[1]), buckets(sys.argv[2])
les = sorted((le for le in b if le != "+Inf"), key=float) + ["+Inf"]
diff = [(le, b[le] - a.get(le, 0)) for le in les]
total = diff[-1][1]
if total == 0:
    print("n/a")
else:
    for le, n in diff:
        if n >= 0.99 * total:
            print("%.1f" % (float(le) * 1e3) if le != "+Inf" else "inf")
            break
PY
}
json() { python3 -c "import json,sys;d=json.load(sys.stdin);print($1)"; }
for run in $(seq "$RUNS"); do
  D=$(mktemp -d)
  P=$((21000 + RANDOM % 20000))
  pids=()
  TLS_FLAGS=() NODE_FLAGS=() SHARE_FLAGS=()
  if [ "${TLS:-0}" = 1 ] || [ "${SHARE:-0}" = 1 ]; then
    "$BIN" certs --dir "$D/tls" --name node >/dev/null
    TLS_FLAGS=(--tls-ca "$D/tls/ca.pem")
    NODE_FLAGS=(--tls-cert "$D/tls/node.pem" --tls-key "$D/tls/node-key.pem")
  fi
  [ "${SHARE:-0}" = 1 ] && SHARE_FLAGS=(--share-compiled)
  BIN_NODE="$BIN"
  BIN="$BIN_NODE ${TLS_FLAGS[*]}"
  for i in 1 2 3; do
    M=()
    [ $i = 1 ] && M=(--metrics-listen 127.0.0.1:$((P+10)))
    $BIN ${NODE_FLAGS[*]} --log "warn,openraft::core::heartbeat=warn" node --id $i --listen 127.0.0.1:$((P+i)) \
      --data-dir "$D/n$i" ${SHARE_FLAGS[*]} ${M[*]} 2> "$D/n$i.log" & pids+=($!)
  done
  trap 'kill ${pids[*]} 2>/dev/null; rm -rf "$D"' EXIT
  sleep 1
  E=127.0.0.1:$((P+1))
  form_cluster "$BIN" "$P"
  $BIN --endpoint $E deploy $KV --service kv >/dev/null
  if [ "$CLIENTS" = 0 ]; then
    term0=$($BIN --endpoint $E --output json cluster status | json 'd["term"]')
    scrape "$D/m0"; sleep 10; scrape "$D/m1"
    log0=$(logs "$D")
    start=$(date +%s.%N)
    $BIN --endpoint $E deploy $GUEST --service py >/dev/null
    took=$(echo "$(date +%s.%N) - $start" | bc)
    scrape "$D/m2"
    log1=$(logs "$D")
    # A second version of the same module (other limits): a new deploy entry, no new bytes.
    start=$(date +%s.%N)
    $BIN --endpoint $E deploy $GUEST --service py --fuel 900000000 >/dev/null
    took2=$(echo "$(date +%s.%N) - $start" | bc)
    log2=$(logs "$D")
    took3=0
    if [ -n "${GUEST_V2:-}" ]; then
      # A new version of the guest (a function added): what the function cache is for.
      start=$(date +%s.%N)
      $BIN --endpoint $E deploy "$GUEST_V2" --service py >/dev/null
      took3=$(echo "$(date +%s.%N) - $start" | bc)
    fi
    sleep 10
    term1=$($BIN --endpoint $E --output json cluster status | json 'd["term"]')
    size=$(stat -c %s "$GUEST")
    echo "run $run (idle): deploy $(printf %.1f "$took") s, v2 $(printf %.1f "$took2") s, new version $(printf %.1f "$took3") s; elections $((term1 - term0)); heartbeat timeouts $(grep -c 'failed to send a heartbeat' "$D/n1.log" || true); heartbeat RTT p99 idle $(rtt99 "$D/m0" "$D/m1") ms, during the first deploy $(rtt99 "$D/m1" "$D/m2") ms; module $size bytes; logs of the 3 nodes grew $((log1 - log0)) bytes (deploy), $((log2 - log1)) (v2): $(echo "scale=8; ($log2 - $log0) / (2 * 3 * $size)" | bc) of the module per deploy per node; module stores $(du -scb "$D"/n*/modules 2>/dev/null | tail -1 | cut -f1) bytes"
    kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true
    rm -rf "$D"; trap - EXIT
    BIN="$BIN_NODE"
    continue
  fi
  scrape "$D/m0"
  base=$($BIN --endpoint $E --output json bench --clients $CLIENTS --duration 10)
  scrape "$D/m1"
  term0=$($BIN --endpoint $E --output json cluster status | json 'd["term"]')
  hb0=$(grep -c 'failed to send a heartbeat' "$D/n1.log" || true)
  $BIN --endpoint $E --output json bench --clients $CLIENTS --duration 45 > "$D/load.json" &
  bench=$!
  sleep 5
  start=$(date +%s.%N)
  $BIN --endpoint $E deploy $GUEST --service py >/dev/null
  took=$(echo "$(date +%s.%N) - $start" | bc)
  scrape "$D/m2"
  wait $bench
  term1=$($BIN --endpoint $E --output json cluster status | json 'd["term"]')
  hb1=$(grep -c 'failed to send a heartbeat' "$D/n1.log" || true)
  b99=$(echo "$base" | json 'd["results"][0]["latency_ms"]["p99"]')
  l99=$(json 'd["results"][0]["latency_ms"]["p99"]' < "$D/load.json")
  lmax=$(json 'd["results"][0]["latency_ms"]["max"]' < "$D/load.json")
  errs=$(json 'd["results"][0]["errors"]' < "$D/load.json")
  echo "run $run: deploy ${took%.*} s; elections $((term1 - term0)); failed writes $errs; heartbeat timeouts $((hb1 - hb0)); heartbeat RTT p99 baseline $(rtt99 "$D/m0" "$D/m1") ms, during deploy $(rtt99 "$D/m1" "$D/m2") ms; p99 baseline $b99 ms, during deploy $l99 ms (max $lmax), ratio $(echo "scale=2; $l99 / $b99" | bc)"
  kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true
  rm -rf "$D"; trap - EXIT
  BIN="$BIN_NODE"
done
