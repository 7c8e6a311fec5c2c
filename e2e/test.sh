#!/usr/bin/env bash
# tug's whole test suite, on a fresh Debian 12 machine, as root: installs the system packages the
# tests need, checks formatting and lints, then runs every test of every crate (unit, integration,
# end-to-end). `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "e2e/test.sh: run as root: the tests create network namespaces, mounts and cgroups" >&2
  exit 1
fi
command -v cargo >/dev/null || { echo "e2e/test.sh: needs the Rust toolchain (cargo)" >&2; exit 1; }

e2e/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --profile ci
else
  cargo test --workspace --locked --no-fail-fast
fi
