# Developer recipes. `just verify` checks and never rewrites; `just fix` rewrites.

# Check formatting, lints and tests (what CI runs, plus clippy).
verify:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo test --workspace

# Rewrite formatting and apply clippy's automatic fixes.
fix:
    cargo fmt --all
    cargo clippy --workspace --all-targets --fix --allow-dirty -- -D warnings

# The README's test command.
test:
    cargo test --workspace

# Build the example guests into examples/guests/target/wasm32-wasip2/release/.
guests:
    rustup target add wasm32-wasip2
    cargo build --release --target wasm32-wasip2 --manifest-path examples/guests/Cargo.toml

# The kv guest in Python (componentize-py from PyPI) -> target/guests/kv-python.wasm.
guest-python:
    python3 -m pip install componentize-py==0.25.1
    cd examples/guests/kv-python && componentize-py -d ../../../wit -w guest componentize app -p . -p ../helpers/python -o ../../../target/guests/kv-python.wasm

# The kv guest in JavaScript (ComponentizeJS from npm) -> target/guests/kv-js.wasm.
guest-js:
    npm install --no-audit --no-fund --prefix examples/guests/kv-js
    cd examples/guests/kv-js && node_modules/.bin/componentize-js kv.js --wit ../../../wit -n guest -d http fetch-event -o ../../../target/guests/kv-js.wasm

# The WASM tax benchmark (guest apply vs native BTreeMap).
bench:
    cargo bench -p waft --bench guest_apply

# The hot-swap benchmark (deploy to serving on all nodes under client load).
bench-hotswap:
    cargo bench -p waft --bench hotswap

# Storage figures: log append per batch size, snapshot throughput, restart with 1M log entries.
bench-storage entries="1000000":
    WAFT_BENCH_LOG_ENTRIES={{entries}} cargo bench -p waft --bench storage

# A local 3-node cluster with the kv guest deployed (Ctrl-C stops it).
dev:
    cargo run --release -- dev

# The end-to-end test: three `waft node` processes driven through the CLI.
e2e:
    cargo test -p waft --test all process::

# Chaos campaigns against real node processes (kills, pauses, partitions, snapshot catch-up,
# a full disk) with a linearizability check. CI runs them for 12 s each; this runs them longer.
# Pass a seed to replay a fault schedule: `just chaos 300 0x1234`.
chaos secs="120" seed="":
    WAFT_CHAOS_SECS={{secs}} WAFT_CHAOS_SEED={{seed}} cargo test -p waft --test all chaos:: -- --nocapture --test-threads 1

# waft vs etcd on this machine (3 + 3 members, fsync on, 64-byte puts, 1/16/64/256 clients):
# writes docs/benchmarks/vs-etcd.{jsonl,md,svg}. `just bench-vs-etcd-to-leader` sends waft's
# load to its leader (a leader-aware client) and writes vs-etcd-to-leader.*;
# `just bench-vs-etcd-batch 16` sends 16 writes per request (SubmitBatch vs etcd's Txn);
# waft's writes go over one Session stream per node (`WAFT_BENCH_API=unary`: a call each).
# `repeat` runs each point's pair that many times and keeps the median ratio.
bench-vs-etcd secs="8" repeat="3":
    WAFT_BENCH_REPEAT={{repeat}} scripts/bench-vs-etcd.sh {{secs}}

bench-vs-etcd-to-leader secs="10":
    WAFT_BENCH_TO_LEADER=1 scripts/bench-vs-etcd.sh {{secs}}

bench-vs-etcd-batch n="16" secs="10":
    WAFT_BENCH_BATCH={{n}} scripts/bench-vs-etcd.sh {{secs}}

# The same with every waft node and etcd member confined to half a core (cgroup v1 quota), as
# if each ran on a machine of its own: writes vs-etcd-cpu0.5.*.
bench-vs-etcd-quota cpu="0.5" secs="8" repeat="3":
    WAFT_BENCH_CPU={{cpu}} WAFT_BENCH_REPEAT={{repeat}} scripts/bench-vs-etcd.sh {{secs}}

# The kv guest in Rust, Python, JS and C on one 3-node cluster, puts/s against the Rust guest.
bench-languages secs="8":
    scripts/bench-languages.sh {{secs}}
