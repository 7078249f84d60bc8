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

# The WASM tax benchmark (guest apply vs native BTreeMap).
bench:
    cargo bench -p waft --bench guest_apply
