#!/usr/bin/env bash
# Install (if absent) and start (if not running) a Docker engine without a bridge.
#
# Idempotent: a second run on a machine whose engine already answers `docker info`
# does nothing. The engine runs with no bridge, no iptables and no masquerading:
# every container uses host networking and talks to 127.0.0.1 only.
#
# Environment:
#   DOCKERD_LOG          where dockerd logs (default /var/log/unibus-dockerd.log)
#   DOCKERD_WAIT_SECONDS how long to wait for the engine to answer (default 60)
set -euo pipefail

log() { printf '[install-docker] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

DOCKERD_LOG="${DOCKERD_LOG:-/var/log/unibus-dockerd.log}"
DOCKERD_WAIT_SECONDS="${DOCKERD_WAIT_SECONDS:-60}"

if docker info >/dev/null 2>&1; then
    log "docker engine already running: $(docker version --format '{{.Server.Version}}')"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    die "docker engine not reachable and not root: cannot install or start it"
fi

if ! command -v dockerd >/dev/null 2>&1; then
    log "dockerd absent: installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null \
        || die "apt-get install docker.io failed"
fi
command -v dockerd >/dev/null 2>&1 || die "dockerd still absent after install"

dockerd_running() {
    [ -f /var/run/docker.pid ] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null
}

if ! dockerd_running; then
    log "starting dockerd (no bridge), logging to $DOCKERD_LOG"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    nohup dockerd --bridge=none --iptables=false --ip-masq=false \
        >>"$DOCKERD_LOG" 2>&1 </dev/null &
    disown || true
fi

deadline=$(( $(date +%s) + DOCKERD_WAIT_SECONDS ))
until docker info >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        log "dockerd log tail:"
        tail -n 40 "$DOCKERD_LOG" >&2 || true
        die "docker engine did not answer within ${DOCKERD_WAIT_SECONDS}s"
    fi
    sleep 0.5
done
log "docker engine ready: $(docker version --format '{{.Server.Version}}')"
