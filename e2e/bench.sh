#!/usr/bin/env bash
# Benchmarks, as root on Debian 12: installs the peers, builds release binaries, runs one
# benchmark program (or all) that prints tug and its peers side by side.
#   e2e/bench.sh            every benchmark
#   e2e/bench.sh pull [N]   image pull + unpack vs skopeo+umoci and containerd (N cold runs)
#   e2e/bench.sh runtime [RUNS] [IDLE]   container start vs runc and crun; IDLE idle containers
#   e2e/bench.sh controller [--duration SECS] [--warmup SECS] [--levels 1,16,256] [--dir DIR]
#                           writes/s and p50/p99 of a 3-replica controller vs a 3-member etcd
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "e2e/bench.sh: run as root" >&2; exit 1; }
e2e/install-deps.sh --bench
cargo build --release --locked -p tug -p tug-e2e --bin tug --bin bench-pull --bin bench-runtime \
  --bin bench-controller
which=${1:-all}
shift || true
case "$which" in
  pull) target/release/bench-pull "$@" ;;
  runtime) target/release/bench-runtime "$@" ;;
  controller) target/release/bench-controller "$@" ;;
  all) target/release/bench-pull && target/release/bench-runtime && target/release/bench-controller ;;
  *) echo "e2e/bench.sh: unknown benchmark $which (pull, runtime, controller)" >&2; exit 2 ;;
esac
