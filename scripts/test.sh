#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs only the Rust toolchain pinned in rust-toolchain.toml (rustfmt + clippy); as root
# it also installs podman for the real-container test (below).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> rustfmt"
cargo fmt --all -- --check
echo "==> clippy (-D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> build binaries (integration tests run the real processes)"
cargo build --workspace --bins --locked
# A real container runtime for the image-job test (it is skipped, saying so, without
# one): podman with runc, and busybox to build its image from. Only as root with apt-get.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! { command -v podman && command -v runc && command -v busybox; } >/dev/null 2>&1; then
    echo "==> installing podman, runc, busybox-static (real container runtime for the tests)"
    pkgs="podman runc busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 \
            && apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1; } \
        || echo "    could not install them: the real-container test will be skipped"
fi
echo "==> tests"
# One test at a time: integration tests start real coordinators and agents and assert
# on wall-clock behaviour (lost within 3 s), which 2 cores shared by parallel clusters
# would blur.
cargo test --workspace --locked -- --test-threads=1
