#!/usr/bin/env bash
# Benchmarks of two builds side by side, on this machine, in one run: BASE (a git
# revision; default 6b89167, the last build before the coordinator reshape) and HEAD (the
# current commit; uncommitted changes are not measured). Each scenario runs BASE then HEAD, ROUNDS times (alternating, so drift
# on the machine hits both), and prints each run's figures and HEAD/BASE ratios of the
# medians.
#
#   scripts/bench-compare.sh [BASE_REV] [ROUNDS]
#
# Scenarios (1,000 agents, 10,000 jobs, --exec simulated; telemetry at 2,000 agents):
# placement burst, at 1,000/s and at 3,000/s offered; telemetry ingest for 30 s.
# Each is built from a git worktree under target/bench-base: BASE with its own target
# dir, HEAD with the main one (sharing its compiled dependencies).
set -euo pipefail
BASE=${1:-6b89167}
ROUNDS=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/target/bench-base/results
mkdir -p "$out"
# A detached worktree of REV at DIR.
worktree() {
  if [ ! -e "$2/.git" ]; then
    git -C "$root" worktree add --force --detach "$2" "$1" >/dev/null
  else
    git -C "$2" checkout -q --detach "$1"
  fi
}
HEAD_REV=$(git -C "$root" rev-parse HEAD)
worktree "$BASE" "$root/target/bench-base/src"
worktree "$HEAD_REV" "$root/target/bench-base/head-src"
echo "==> building BASE $(git -C "$root" rev-parse --short "$BASE") and HEAD $(git -C "$root" rev-parse --short HEAD) (release)" >&2
(cd "$root/target/bench-base/src" && CARGO_TARGET_DIR=$root/target/bench-base/target cargo build --release --bins -q)
(cd "$root/target/bench-base/head-src" && CARGO_TARGET_DIR=$root/target/bench-base/head-target cargo build --release --bins -q)
declare -A BIN=([base]=$root/target/bench-base/target/release [head]=$root/target/bench-base/head-target/release)

scenarios=(
  "burst|placement --agents 1000 --jobs 10000 --exec simulated --failovers 0|placements_per_s award_p99_ms"
  "1000/s|placement --agents 1000 --jobs 10000 --rate 1000 --exec simulated --failovers 0|placements_per_s award_p99_ms"
  "3000/s|placement --agents 1000 --jobs 10000 --rate 3000 --exec simulated --failovers 0|placements_per_s award_p99_ms"
  "telemetry|telemetry --agents 2000 --gpus-per-agent 8 --seconds 30|applied_ratio ingest_p99_ms"
)

# The median of the numbers on stdin.
median() { sort -g | awk '{v[NR]=$1} END {if (NR) print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

printf '%-10s %-18s %12s %12s %8s\n' scenario figure BASE HEAD ratio
for s in "${scenarios[@]}"; do
  IFS='|' read -r name args figures <<<"$s"
  tag=${name//\//per}
  for ((r = 1; r <= ROUNDS; r++)); do
    for build in base head; do
      # shellcheck disable=SC2086 # args are words
      "${BIN[$build]}/fleetmesh-bench" $args 2>"$out/$tag-$build-$r.log" | tail -1 >"$out/$tag-$build-$r.json"
      echo "$name $build round $r: $(cat "$out/$tag-$build-$r.json")" >&2
    done
  done
  for f in $figures; do
    b=$(for r in $(seq "$ROUNDS"); do jq -r ".$f" "$out/$tag-base-$r.json"; done | median)
    h=$(for r in $(seq "$ROUNDS"); do jq -r ".$f" "$out/$tag-head-$r.json"; done | median)
    ratio=$(awk -v b="$b" -v h="$h" 'BEGIN {if (b > 0) printf "%.2f", h / b; else print "-"}')
    printf '%-10s %-18s %12s %12s %8s\n' "$name" "$f" "$b" "$h" "$ratio"
  done
done
