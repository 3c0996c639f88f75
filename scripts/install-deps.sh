#!/usr/bin/env bash
# Installs what ferry and its tests need on Debian/Ubuntu (as root): nftables (and its
# library, which ferry uses in-process), iproute2 for the lab's namespaces, curl as the client;
# podman, runc, umoci and skopeo build and run the container image (scripts/build-image.sh).
# bird2, frr and gobgpd are the peers of the BGP interop tests
# (crates/ferry-bgp/tests/{bird,frr,gobgp}.rs); iptables (iptables-nft) loads kube-proxy's layout
# for bench/first-packet.sh and its test.
set -euo pipefail
pkgs=(nftables libnftables1 iproute2 curl conntrack procps arping ndisc6 keepalived bird2 iputils-ping frr
      gobgpd iptables prometheus podman runc umoci skopeo ca-certificates binutils python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The official Kubernetes Python client, for ferry-apiserver's real-client tests.
if command -v python3 >/dev/null && ! python3 -c 'import kubernetes' 2>/dev/null; then
  python3 -m pip install -q 'kubernetes==37.0.2' \
    || python3 -m pip install -q --break-system-packages 'kubernetes==37.0.2'
fi
