# Sourced by the benchmark scripts: a 3-member etcd and a 3-node waft on loopback.
#
# bench_setup: installs etcd if missing, builds the release binary (WAFT; WAFT_BIN=PATH uses
#   that build instead, for a same-run A/B of two builds) and the example guests, makes a scratch directory DIR and an empty PIDS list; stop_all kills every pid in
#   PIDS and removes DIR (the scripts trap it on EXIT).
# start_etcd DIR: members e1..e3, clients on 127.0.0.1:2379{1,2,3}, peers on 2380{1,2,3};
#   their pids are appended to PIDS and ETCD_PIDS.
# start_waft DIR WAFT: nodes 1..3 on 127.0.0.1:1700{1,2,3} (node 1 initializes, 2 and 3 join),
#   waits until all three are voters; pids appended to PIDS and WAFT_PIDS. Node i also gets the
#   arguments the function `waft_args i` prints, if the script defines it.
# Either puts each process in a CPU cgroup with `confine NAME PID` if the script defines it.

start_etcd() {
  local dir=$1 i
  local cluster="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
  for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$dir/e$i" \
      --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
      --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token waft-bench \
      >"$dir/etcd$i.log" 2>&1 &
    PIDS+=($!)
    ETCD_PIDS+=($!)
    if declare -F confine >/dev/null; then confine "etcd$i" $!; fi
  done
}

start_waft() {
  local dir=$1 waft=$2 i extra voters
  for i in 1 2 3; do
    extra=()
    if declare -F waft_args >/dev/null; then read -r -a extra <<<"$(waft_args $i)"; fi
    if [ "$i" = 1 ]; then
      "$waft" node --id 1 --listen 127.0.0.1:17001 --data-dir "$dir/w1" "${extra[@]}" 2>"$dir/waft1.log" &
    else
      "$waft" node --id "$i" --listen "127.0.0.1:1700$i" --data-dir "$dir/w$i" --join 127.0.0.1:17001 \
        "${extra[@]}" 2>"$dir/waft$i.log" &
    fi
    PIDS+=($!)
    WAFT_PIDS+=($!)
    if declare -F confine >/dev/null; then confine "waft$i" $!; fi
    if [ "$i" = 1 ]; then
      for _ in $(seq 50); do "$waft" --endpoint 127.0.0.1:17001 cluster status >/dev/null 2>&1 && break; sleep 0.2; done
      "$waft" --endpoint 127.0.0.1:17001 cluster init >/dev/null
    fi
  done
  for _ in $(seq 100); do
    voters=$("$waft" --endpoint 127.0.0.1:17001 --output json cluster status 2>/dev/null | grep -o '"voter":true' | wc -l || true)
    [ "$voters" = 3 ] && break
    sleep 0.2
  done
}

bench_setup() {
  if ! command -v etcd >/dev/null; then
    echo "etcd is not installed; installing Debian's etcd-server (needs root)" >&2
    apt-get install -y etcd-server etcd-client >/dev/null
  fi
  if [ -z "${WAFT_BIN:-}" ]; then cargo build --release --quiet; fi
  rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
  cargo build --release --quiet --target wasm32-wasip2 --manifest-path examples/guests/Cargo.toml
  WAFT=${WAFT_BIN:-target/release/waft}
  DIR=$(mktemp -d)
  PIDS=()
}

stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
