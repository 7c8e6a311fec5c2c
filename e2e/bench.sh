#!/usr/bin/env bash
# Benchmarks, as root on Debian 12: installs the peers, builds release binaries, runs one
# benchmark program (or all) that prints tug and its peers side by side.
#   e2e/bench.sh            every benchmark
#   e2e/bench.sh pull [N]   image pull + unpack vs skopeo+umoci and containerd (N cold runs)
#   e2e/bench.sh runtime [RUNS] [IDLE]   container start vs runc and crun; IDLE idle containers
#   e2e/bench.sh controller [--duration SECS] [--warmup SECS] [--levels 1,16,256] [--rounds N (4)] [--dir DIR]
#                           writes/s and p50/p99 of a 3-replica controller vs a 3-member etcd
#   e2e/bench.sh schedule [--scale NODES:TASKS,...]   scheduling and convergence with simulated
#                           agents (default 1000:100000 and 10000:1000000)
#   e2e/bench.sh startup [REPLICAS]   apply -> containers running on 3 agent hosts, per-container
#                           startup latency (median, p99) vs Kubernetes' pod-startup SLO
#   e2e/bench.sh metrics [CONTAINERS] [WINDOW_SECS]   agent /metrics scrape time, agent cpu at a
#                           15 s scrape interval and RSS with 200 idle containers (default)
#   e2e/bench.sh network [SECONDS] [CYCLES] [ROUNDS] [PATHS] [--big-tcp] [--length BYTES]
#                           [--congestion ALGO] [--no-nat]
#                           iperf3 and ping container-to-container across two hosts (host-gw,
#                           vxlan) vs host-to-host, in alternating rounds (default 9 rounds of
#                           10 s per path, about 14 min); network setup/teardown vs the CNI
#                           bridge + host-local plugins
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "e2e/bench.sh: run as root" >&2; exit 1; }
e2e/install-deps.sh --bench
cargo build --release --locked -p tug -p tug-e2e --bin tug --bin bench-pull --bin bench-runtime \
  --bin bench-controller --bin bench-schedule --bin bench-startup --bin bench-metrics \
  --bin bench-network
which=${1:-all}
shift || true
case "$which" in
  pull) target/release/bench-pull "$@" ;;
  runtime) target/release/bench-runtime "$@" ;;
  controller) target/release/bench-controller "$@" ;;
  schedule) target/release/bench-schedule "$@" ;;
  startup) target/release/bench-startup "$@" ;;
  metrics) target/release/bench-metrics "$@" ;;
  network) target/release/bench-network "$@" ;;
  all) target/release/bench-pull && target/release/bench-runtime && target/release/bench-controller \
    && target/release/bench-schedule && target/release/bench-startup && target/release/bench-metrics \
    && target/release/bench-network ;;
  *) echo "e2e/bench.sh: unknown benchmark $which (pull, runtime, controller, schedule, startup, metrics, network)" >&2; exit 2 ;;
esac
