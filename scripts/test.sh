#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs only the Rust toolchain pinned in rust-toolchain.toml (rustfmt + clippy).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> rustfmt"
cargo fmt --all -- --check
echo "==> clippy (-D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> build binaries (integration tests run the real processes)"
cargo build --workspace --bins --locked
echo "==> tests"
# One test at a time: integration tests start real coordinators and agents and assert
# on wall-clock behaviour (lost within 3 s), which 2 cores shared by parallel clusters
# would blur.
cargo test --workspace --locked -- --test-threads=1
