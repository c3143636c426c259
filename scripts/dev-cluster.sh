#!/usr/bin/env bash
# Local development mesh: a CA and certificates, one coordinator and 3 agents with
# SIMULATED GPUs, all on loopback; `up` also runs the example workflow to the end.
# State lives in .dev-cluster/ (git-ignored).
#
#   scripts/dev-cluster.sh up       build, (re)start the mesh, show the fleet
#   scripts/dev-cluster.sh status   show agents and GPUs
#   scripts/dev-cluster.sh env      print the exports that point the CLI at this mesh
#   scripts/dev-cluster.sh down     stop everything
#
# Ports: FLEETMESH_DEV_CTL_PORT (UDP, default 7400), FLEETMESH_DEV_API_PORT (default 7401).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${FLEETMESH_DEV_DIR:-$ROOT/.dev-cluster}
CTL=${FLEETMESH_DEV_CTL_PORT:-7400}
API=${FLEETMESH_DEV_API_PORT:-7401}
BIN=$ROOT/target/debug
PKI=$DIR/pki

cli() {
  "$BIN/fleetmesh" --api "https://127.0.0.1:$API" --ca "$PKI/ca.pem" \
    --cert "$PKI/operator-dev.pem" --key "$PKI/operator-dev.key" "$@"
}

down() {
  if [ -d "$DIR/run" ]; then
    for f in "$DIR"/run/*.pid; do
      [ -e "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
  fi
}

# Submit FILE, wait for its workflow to finish, show its jobs (arrays folded) and the
# output of JOB; returns non-zero unless the workflow succeeded.
run_example() {
  local file=$1 job=$2 wf state=running
  echo "==> $file: fleetmesh plan, then submit"
  cli plan "$file" | head -12 || true
  wf=$(cli submit "$file")
  for _ in $(seq 1 600); do
    state=$(cli workflows | awk -v id="$wf" '$1 == id { print $2 }')
    [ "$state" != running ] && break
    sleep 0.1
  done
  cli jobs --workflow "$wf"
  echo
  echo "output of $wf.$job:"
  cli logs "$wf.$job"
  echo "workflow $wf: $state"
  echo
  [ "$state" = succeeded ]
}

up() {
  down
  echo "==> building (debug)"
  cargo build --bins -q
  mkdir -p "$DIR/run" "$DIR/logs"
  if [ ! -f "$PKI/ca.pem" ]; then
    echo "==> creating a dev CA and certificates in $PKI"
    "$BIN/fleetmesh" certs init --dir "$PKI" --trust-domain dev.fleetmesh.local >/dev/null
    "$BIN/fleetmesh" certs issue --dir "$PKI" --kind coordinator --name dev >/dev/null
    "$BIN/fleetmesh" certs issue --dir "$PKI" --kind operator --name dev >/dev/null
    "$BIN/fleetmesh" certs issue --dir "$PKI" --kind agent --name gpu-eu-1 --region eu-west-1 --jurisdiction EU --provider aws >/dev/null
    "$BIN/fleetmesh" certs issue --dir "$PKI" --kind agent --name gpu-eu-2 --region eu-central-1 --jurisdiction EU --provider onprem >/dev/null
    "$BIN/fleetmesh" certs issue --dir "$PKI" --kind agent --name gpu-us-1 --region us-east-1 --jurisdiction US --provider gcp >/dev/null
  fi
  echo "==> starting coordinator (control udp/$CTL, API https://127.0.0.1:$API)"
  "$BIN/fleetmesh-coordinator" --listen "127.0.0.1:$CTL" --api-listen "127.0.0.1:$API" \
    --data-dir "$DIR/coordinator" --ca "$PKI/ca.pem" \
    --cert "$PKI/coordinator-dev.pem" --key "$PKI/coordinator-dev.key" \
    --ca-key "$PKI/ca.key" \
    >"$DIR/logs/coordinator.log" 2>&1 &
  echo $! >"$DIR/run/coordinator.pid"
  for _ in $(seq 1 100); do
    cli agents >/dev/null 2>&1 && break
    sleep 0.1
  done
  # Jobs run as the unprivileged user fleetmesh-job when we can switch to it (root), with
  # the agents' data dirs where that user can pass through to its own work dirs.
  local job_args=() agents_dir="$DIR/agents"
  if [ "$(id -u)" = 0 ]; then
    getent passwd fleetmesh-job >/dev/null \
      || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fleetmesh-job
    job_args=(--job-user fleetmesh-job)
    agents_dir=${FLEETMESH_DEV_AGENTS_DIR:-/var/tmp/fleetmesh-dev-agents}
    mkdir -p "$agents_dir" && chmod 0711 "$agents_dir"
    echo "==> jobs run as the unprivileged user fleetmesh-job (agent data in $agents_dir)"
  else
    echo "==> not root: jobs run as $(id -un) (as root they run as the unprivileged fleetmesh-job)"
  fi
  local specs=("gpu-eu-1:8xH100-80GB" "gpu-eu-2:4xA100-40GB" "gpu-us-1:2xL4-24GB")
  for s in "${specs[@]}"; do
    local name=${s%%:*} spec=${s#*:}
    echo "==> starting agent $name with simulated GPUs $spec"
    "$BIN/fleetmesh-agent" --coordinator "127.0.0.1:$CTL" --data-dir "$agents_dir/$name" \
      --ca "$PKI/ca.pem" --cert "$PKI/agent-$name.pem" --key "$PKI/agent-$name.key" \
      --simulate-gpus "$spec" "${job_args[@]}" >"$DIR/logs/agent-$name.log" 2>&1 &
    echo $! >"$DIR/run/agent-$name.pid"
  done
  for _ in $(seq 1 100); do
    n=$(cli agents -o json 2>/dev/null | grep -c '"state": "connected"' || true)
    [ "$n" = 3 ] && break
    sleep 0.1
  done
  sleep 1.2 # one telemetry interval, so utilisation figures are filled in
  echo
  cli agents
  echo
  cli gpus
  echo
  echo "==> submitting examples/hello-pipeline.yaml"
  local wf
  wf=$(cli submit examples/hello-pipeline.yaml)
  echo "workflow $wf"
  for _ in $(seq 1 300); do
    pending=$(cli jobs --workflow "$wf" -o json | grep -cE '"state": "(waiting|queued|starting|running)"' || true)
    [ "$pending" = 0 ] && break
    sleep 0.1
  done
  sleep 0.2 # the workflow's own state follows its jobs on the next scheduler tick
  local state
  state=$(cli workflows | awk -v id="$wf" '$1 == id { print $2 }')
  echo
  cli jobs --workflow "$wf"
  echo
  echo "output of $wf.train:"
  cli logs "$wf.train"
  echo "workflow $wf: $state"
  echo
  echo "==> data: putting examples/corpus (EU only) and running examples/data-pipeline.yaml"
  cli data put examples/corpus --name corpus --jurisdiction EU
  wf=$(cli submit examples/data-pipeline.yaml)
  for _ in $(seq 1 300); do
    pending=$(cli jobs --workflow "$wf" -o json | grep -cE '"state": "(waiting|queued|starting|running)"' || true)
    [ "$pending" = 0 ] && break
    sleep 0.1
  done
  sleep 0.2
  state=$(cli workflows | awk -v id="$wf" '$1 == id { print $2 }')
  cli jobs --workflow "$wf"
  echo
  cli data ls
  echo
  echo "top words (output of $wf.count):"
  cli logs "$wf.count"
  echo "workflow $wf: $state"
  echo
  run_example examples/scatter-gather.yaml reduce
  run_example examples/gang-allreduce.yaml allreduce
  echo
  echo "The mesh keeps running. Try:"
  echo "  eval \"\$(scripts/dev-cluster.sh env)\"; target/debug/fleetmesh agents show gpu-eu-1"
  echo "  target/debug/fleetmesh metrics | grep fleet_"
  echo "  target/debug/fleetmesh submit examples/gpu-train-eval.yaml; target/debug/fleetmesh jobs"
  echo "  target/debug/fleetmesh run --gpus 1 -- sh -c 'echo \$CUDA_VISIBLE_DEVICES'"
  echo "  target/debug/fleetmesh data show corpus; target/debug/fleetmesh data get data-pipeline.count.counts /tmp/counts"
  echo "  J=\$(target/debug/fleetmesh tokens create --region eu-west-3 --jurisdiction EU --provider ovh)"
  echo "  target/debug/fleetmesh-agent --join \"\$J\" --data-dir /tmp/fm-joined --simulate-gpus 2xH100-80GB"
  echo "Logs: $DIR/logs/   Stop: scripts/dev-cluster.sh down"
}

case "${1:-up}" in
  up) up ;;
  down) down; echo "stopped" ;;
  status) cli agents; echo; cli gpus ;;
  env)
    echo "export FLEETMESH_API=https://127.0.0.1:$API FLEETMESH_CA=$PKI/ca.pem" \
      "FLEETMESH_CERT=$PKI/operator-dev.pem FLEETMESH_KEY=$PKI/operator-dev.key"
    ;;
  *) echo "usage: $0 up|status|env|down" >&2; exit 2 ;;
esac
