#!/usr/bin/env bash
# Installs every system package that tug's tests and quick start use, on Debian 12, as root;
# with --bench also the peers the benchmarks measure tug against. Idempotent: does nothing when
# everything is there. The Rust toolchain itself is assumed.
set -euo pipefail

PACKAGES=(
  iproute2          # ip netns / link / addr: the test hosts
  iptables          # tug's masquerade and published ports; test-bed partitions (in namespaces)
  busybox-static    # content of the test images, ping/wget/httpd inside test hosts
  docker-registry   # the real registry (CNCF distribution)
  apache2-utils     # htpasswd (bcrypt) for the registry's basic auth
  umoci             # builds the OCI test images
  skopeo            # pushes them, converts to Docker schema2
  runc              # the same bundle under runc and crun as under tug runtime (tests)
  crun
  tar
  openssl           # the token server's signing key (registry bearer-token auth)
  prometheus        # promtool check metrics; a real server scraping the cluster (metrics test)
  coreutils
  ca-certificates
  containernetworking-plugins  # bridge + host-local: the agent's external CNI mode (tests)
)
if [ "${1:-}" = --bench ]; then
  PACKAGES+=(
    containerd      # ctr image pull (the image pull benchmark's peer)
    etcd-server     # etcd, 3 members on loopback (the controller benchmark's peer)
    iperf3          # container-to-container throughput (the network benchmark)
  )
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Debian's docker-registry package enables a system service listening on every interface; tug
# only runs the binary with its own config, so switch off the service this install just added.
if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null \
   && [ -d /run/systemd/system ]; then
  systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
fi
# Likewise etcd-server's system service: the controller benchmark starts its own members.
if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null \
   && [ -d /run/systemd/system ]; then
  systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi
