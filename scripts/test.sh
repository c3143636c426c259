#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs only the Rust toolchain pinned in rust-toolchain.toml (rustfmt + clippy); as root
# it also installs what the container and installer tests use (below), and cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> rustfmt"
cargo fmt --all -- --check
echo "==> no import cycles among modules"
python3 scripts/module-cycles.py coordinator/src agent/src data/src protocol/src api/src cli/src
echo "==> clippy (-D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> build binaries (integration tests run the real processes)"
cargo build --workspace --bins --locked
# As root with apt-get, what the tests use that the machine may lack (each test that needs
# one of them says so and skips when it is missing):
# - podman with runc, and busybox to build its image from: the real-container test;
# - debootstrap and systemd-container: the installer test boots a Debian tree with
#   systemd-nspawn (the tree is built once, ~50 s, and kept in /var/cache/fleetmesh-test).
ROOTFS=/var/cache/fleetmesh-test/rootfs
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    for p in podman runc busybox debootstrap systemd-nspawn; do
        command -v "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "==> installing podman runc busybox-static debootstrap systemd-container (missing: ${need[*]})"
        pkgs="podman runc busybox-static debootstrap systemd-container"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                && apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1; } \
            || echo "    could not install them: the tests that need them will be skipped"
    fi
    if [ ! -x "$ROOTFS/usr/lib/systemd/systemd" ] && command -v debootstrap >/dev/null; then
        echo "==> building the Debian tree the installer test boots ($ROOTFS)"
        mkdir -p "$(dirname "$ROOTFS")"
        rm -rf "$ROOTFS.new"
        if debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,util-linux,procps \
            bookworm "$ROOTFS.new" http://deb.debian.org/debian >/dev/null 2>&1; then
            mv "$ROOTFS.new" "$ROOTFS"
        else
            echo "    debootstrap failed: the installer test will be skipped"
        fi
    fi
fi
# moto's EC2 server and the aws CLI (PyPI) for the aws-ec2 pool program's test.
VENV=target/test-venv
if [ ! -x "$VENV/bin/moto_server" ] || [ ! -x "$VENV/bin/aws" ]; then
    echo "==> installing moto[server] and awscli into $VENV (for the EC2 pool test)"
    { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q 'moto[server]' awscli; } >/dev/null 2>&1 \
        || echo "    could not install them: the EC2 pool test will be skipped"
fi
echo "==> tests"
# One test at a time: integration tests start real coordinators and agents and assert
# on wall-clock behaviour (lost within 3 s), which 2 cores shared by parallel clusters
# would blur.
cargo test --workspace --locked -- --test-threads=1
echo "==> fuzz targets, briefly (scripts/fuzz.sh 600 runs each for 10 minutes)"
scripts/fuzz.sh "${FLEETMESH_FUZZ_SECONDS:-15}"
