#!/usr/bin/env bash
# Build and run the frame/message decoder fuzz target for a short time.
#   scripts/fuzz.sh [SECONDS]   (default 60)
# Uses cargo-fuzz (installed from crates.io if missing) and a nightly toolchain when one
# is installed, else the pinned stable compiler with RUSTC_BOOTSTRAP=1 (libFuzzer needs
# -Z sanitizer flags).
set -euo pipefail
cd "$(dirname "$0")/../protocol"
SECS=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  TC=(+nightly)
else
  TC=()
  export RUSTC_BOOTSTRAP=1
fi
mkdir -p fuzz/corpus/decode_frames
cargo "${TC[@]}" fuzz run decode_frames fuzz/corpus/decode_frames -- -max_total_time="$SECS" -rss_limit_mb=512
