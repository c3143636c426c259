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
# Copies the binary to /usr/local/bin, writes /etc/fleetmesh/agent.toml (0600: it may hold
# the join string), installs and starts fleetmesh-agent.service. Peers fetch datasets from
# this node on UDP --data-listen (default 0.0.0.0:7402): allow it between nodes.
set -euo pipefail
BINARY=target/release/fleetmesh-agent
DATA_LISTEN=0.0.0.0:7402
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$2; shift 2 ;;
    --coordinator) COORD=$2; shift 2 ;;
    --join) JOIN=$2; shift 2 ;;
    --ca) CA=$2; shift 2 ;;
    --cert) CERT=$2; shift 2 ;;
    --key) KEY=$2; shift 2 ;;
    --data-listen) DATA_LISTEN=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
install -m 0755 "$BINARY" /usr/local/bin/fleetmesh-agent
install -d -m 0755 /etc/fleetmesh
if [ -n "${JOIN:-}" ]; then
  umask 077
  cat >/etc/fleetmesh/agent.toml <<CONF
join = "$JOIN"
data-dir = "/var/lib/fleetmesh-agent"
telemetry-interval = "1s"
data-listen = "$DATA_LISTEN"
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
CONF
fi
install -m 0644 "$here/fleetmesh-agent.service" /etc/systemd/system/fleetmesh-agent.service
systemctl daemon-reload
systemctl enable --now fleetmesh-agent.service
systemctl --no-pager status fleetmesh-agent.service || true
