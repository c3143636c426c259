#!/usr/bin/env bash
# Run the fuzz targets of everything that reads bytes from the network or a user:
#   decode_frames  control-plane and data-plane frames, both directions
#   workflow       workflow files: parse + validate (stack, alias bombs, limits)
#   manifest       dataset manifests (bincode as on the data port, JSON as on the API)
#   api_bodies     the API's JSON request bodies and their checks
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   (default 60 s each, every target)
#
# Uses cargo-fuzz (installed from crates.io if missing) and a nightly toolchain when one
# is installed, else the pinned stable compiler with RUSTC_BOOTSTRAP=1 (libFuzzer needs
# -Z sanitizer flags). Seeds come from examples/ and from small hand-made inputs; a crash
# leaves its input under protocol/fuzz/artifacts/TARGET/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/../protocol"
SECS=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(decode_frames workflow manifest api_bodies)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  TC=(+nightly)
else
  TC=()
  export RUSTC_BOOTSTRAP=1
fi
# Seeds.
mkdir -p fuzz/corpus/{decode_frames,workflow,manifest,api_bodies}
cp ../examples/*.yaml fuzz/corpus/workflow/ 2>/dev/null || true
printf 'name: w\njobs:\n  a:\n    command: [x]\n  b:\n    needs: [a]\n    script: &s "x"\n  c:\n    needs: [b]\n    script: *s\n' > fuzz/corpus/workflow/alias.yaml
printf '{"chunk_size":4,"files":[{"path":"a/b","size":5,"mode":420,"chunks":[[%s],[%s]]}]}' \
  "$(seq -s, 0 31)" "$(seq -s, 1 32)" > fuzz/corpus/manifest/one.json
printf '{"name":"raw","jurisdictions":["EU"],"manifest":{"chunk_size":4,"files":[]},"on":null}' > fuzz/corpus/api_bodies/put.json
printf '{"region":"eu-west-1","labels":{"tier":"gold"},"uses":2,"ttl":"1h"}' > fuzz/corpus/api_bodies/token.json
for t in "${TARGETS[@]}"; do
  echo "==> fuzz $t for ${SECS}s"
  log=$(mktemp)
  rc=0
  cargo "${TC[@]}" fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$SECS" -rss_limit_mb=1024 \
    -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E "^Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|panicked" "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "$log"
    echo "fuzz target $t failed (exit $rc): its input is under protocol/fuzz/artifacts/$t/"
    exit 1
  fi
  rm -f "$log"
done
