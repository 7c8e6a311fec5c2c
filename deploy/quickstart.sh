#!/usr/bin/env bash
# tug quick start, as root on Debian 12: builds the `tug` binary, serves the test images from a
# local registry, brings up a single-host cluster (`tug up`: one controller and one agent in one
# process) and runs manifests/hello.yaml on it. The cluster keeps running; stop it with
#   deploy/quickstart.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${TUG_DATA_DIR:-/var/lib/tug-quickstart}
TUG=target/release/tug
TESTBED=target/release/tug-testbed
REGISTRY=127.0.0.1:5000
CONTROLLER=127.0.0.1:7440

stop_pid() { # stop a process this script started, by the PID it recorded
  local f=$1
  if [ -f "$f" ]; then
    local pid; pid=$(cat "$f")
    kill "$pid" 2>/dev/null && echo "stopped $(basename "$f" .pid) (pid $pid)"
    rm -f "$f"
  fi
}

if [ "${1:-}" = stop ]; then
  stop_pid "$DATA/up.pid"
  stop_pid "$DATA/registry.pid"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "quickstart: run as root (containers need namespaces and cgroups)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "quickstart: needs the Rust toolchain (cargo)" >&2; exit 1; }
e2e/install-deps.sh
mkdir -p "$DATA"

echo "== building tug (release)"
cargo build --release --locked -p tug -p tug-e2e --bin tug --bin tug-testbed

echo "== serving the test images on $REGISTRY"
stop_pid "$DATA/registry.pid"
"$TESTBED" registry "$REGISTRY" >"$DATA/registry.log" 2>&1 &
echo $! >"$DATA/registry.pid"
for _ in $(seq 100); do
  grep -q '^registry on' "$DATA/registry.log" 2>/dev/null && break
  kill -0 "$(cat "$DATA/registry.pid")" 2>/dev/null || { cat "$DATA/registry.log" >&2; exit 1; }
  sleep 0.2
done

echo "== starting the cluster (tug up, data in $DATA)"
stop_pid "$DATA/up.pid"
"$TUG" --data-dir "$DATA" --insecure-registry "$REGISTRY" up >"$DATA/up.log" 2>&1 &
echo $! >"$DATA/up.pid"
ready=
for _ in $(seq 100); do
  if ! kill -0 "$(cat "$DATA/up.pid")" 2>/dev/null; then
    echo "quickstart: the cluster did not start:" >&2
    cat "$DATA/up.log" >&2
    rm -f "$DATA/up.pid"
    stop_pid "$DATA/registry.pid"
    exit 1
  fi
  if "$TUG" --controller "$CONTROLLER" nodes >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.2
done
[ -n "$ready" ] || { echo "quickstart: the cluster did not answer within 20s; see $DATA/up.log" >&2; exit 1; }

echo "== tug apply -f manifests/hello.yaml"
"$TUG" --controller "$CONTROLLER" apply -f manifests/hello.yaml
"$TUG" --controller "$CONTROLLER" rollout status hello
"$TUG" --controller "$CONTROLLER" get service hello
echo "cluster running (logs: $DATA/up.log); stop it with: deploy/quickstart.sh stop"
