#!/usr/bin/env bash
# Install the Fleetmesh agent as a systemd service on this node (run as root).
#
# With a join string (zero-touch; the key is generated on this node, the certificate is
# short-lived and renewed automatically):
#   scripts/install-agent.sh --binary target/release/fleetmesh-agent --join 'fleetmesh-join:v1/...'
#
# With pre-issued certificates (offline installs):
#   scripts/install-agent.sh --binary target/release/fleetmesh-agent \
#       --coordinator coord.example.com:7400 --ca ca.pem --cert agent-NAME.pem --key agent-NAME.key
#
# Copies the binary to /usr/local/bin, creates the unprivileged system user jobs run as
# (fleetmesh-job, no home, no shell) and a pool of accounts in its group
# (fleetmesh-job-0 .. fleetmesh-job-63; --job-accounts N, 0 for none) so that attempts
# running side by side each run as an account of their own, writes /etc/fleetmesh/agent.toml (0600: it may hold
# the join string), installs and starts fleetmesh-agent.service. Each attempt runs in a
# transient systemd unit of its own, outside the agent's sandbox. Peers fetch datasets
# from this node on UDP --data-listen (default 0.0.0.0:7402): allow it between nodes.
#
# Extra agent settings (any `key = value` line of agent.toml) can be appended with
# --extra 'simulate-gpus = "1xH100-80GB"' (repeatable).
set -euo pipefail
BINARY=target/release/fleetmesh-agent
DATA_LISTEN=0.0.0.0:7402
JOB_USER=fleetmesh-job
# Attempts that can run side by side, each as its own account.
JOB_ACCOUNTS=64
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$2; shift 2 ;;
    --coordinator) COORD=$2; shift 2 ;;
    --join) JOIN=$2; shift 2 ;;
    --ca) CA=$2; shift 2 ;;
    --cert) CERT=$2; shift 2 ;;
    --key) KEY=$2; shift 2 ;;
    --data-listen) DATA_LISTEN=$2; shift 2 ;;
    --job-user) JOB_USER=$2; shift 2 ;;
    --job-accounts) JOB_ACCOUNTS=$2; shift 2 ;;
    --extra) EXTRA+=("$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
install -m 0755 "$BINARY" /usr/local/bin/fleetmesh-agent
install -d -m 0755 /etc/fleetmesh /usr/local/share/doc/fleetmesh
[ -f "$here/../README.md" ] && install -m 0644 "$here/../README.md" /usr/local/share/doc/fleetmesh/README.md
[[ "$JOB_ACCOUNTS" =~ ^[0-9]+$ ]] || { echo "--job-accounts takes a count" >&2; exit 2; }
nologin() { useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$@"; }
getent passwd "$JOB_USER" >/dev/null || nologin "$JOB_USER"
job_group=$(id -gn "$JOB_USER")
for ((i = 0; i < JOB_ACCOUNTS; i++)); do
  getent passwd "$JOB_USER-$i" >/dev/null || nologin --gid "$job_group" "$JOB_USER-$i"
done
POOL_LINE=""
[ "$JOB_ACCOUNTS" -gt 0 ] && POOL_LINE="job-accounts = \"$JOB_USER-\""
if [ -n "${JOIN:-}" ]; then
  umask 077
  cat >/etc/fleetmesh/agent.toml <<CONF
join = "$JOIN"
data-dir = "/var/lib/fleetmesh-agent"
telemetry-interval = "1s"
data-listen = "$DATA_LISTEN"
job-user = "$JOB_USER"
job-launcher = "systemd-run"
$POOL_LINE
CONF
else
  : "${COORD:?--coordinator HOST:PORT is required}" "${CA:?--ca is required}" "${CERT:?--cert is required}" "${KEY:?--key is required}"
  install -m 0644 "$CA" /etc/fleetmesh/ca.pem
  install -m 0644 "$CERT" /etc/fleetmesh/agent.pem
  install -m 0600 "$KEY" /etc/fleetmesh/agent.key
  umask 077
  cat >/etc/fleetmesh/agent.toml <<CONF
coordinator = "$COORD"
data-dir = "/var/lib/fleetmesh-agent"
ca = "/etc/fleetmesh/ca.pem"
cert = "/etc/fleetmesh/agent.pem"
key = "/etc/fleetmesh/agent.key"
telemetry-interval = "1s"
data-listen = "$DATA_LISTEN"
job-user = "$JOB_USER"
job-launcher = "systemd-run"
$POOL_LINE
CONF
fi
for line in "${EXTRA[@]}"; do printf '%s\n' "$line" >>/etc/fleetmesh/agent.toml; done
install -m 0644 "$here/fleetmesh-agent.service" /etc/systemd/system/fleetmesh-agent.service
systemctl daemon-reload
systemctl enable --now fleetmesh-agent.service
systemctl --no-pager status fleetmesh-agent.service || true
