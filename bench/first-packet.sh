#!/usr/bin/env bash
# First-packet benchmark: the latency of a new TCP connection (SYN out -> SYN-ACK in) to the
# 1st, 100th, 1000th, 5000th and 10,000th service with 10,000 services x 10 endpoints loaded,
# for ferry's layout in one table, ferry's sharded layout (16 tables) and kube-proxy's iptables
# layout through iptables-nft, plus the floor without rules (every layout checked first to DNAT
# each target to its own endpoints): in one run, in network namespaces of its own
# (fp<PID>-fp-{client,node,ep}, removed on exit, also on failure and Ctrl-C). Needs root,
# iproute2, nftables, iptables (iptables-nft-restore) and conntrack.
# Usage: bench/first-packet.sh [flags of `ferry lab bench-first-packet`, e.g. --services 1000
#        --targets 1,1000 --samples 500 --layouts ferry,kube-proxy-iptables]
# kube-proxy's nftables layout too (minutes to load at 10,000 services):
#   bench/first-packet.sh --layouts direct,ferry,ferry-sharded,kube-proxy-iptables,kube-proxy-nftables
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench/first-packet.sh: needs root (network namespaces)" >&2
  exit 1
fi
cargo build --release -q -p ferry -p ferry-lab
prefix="fp$$"
cleanup() {
  for ns in "$prefix-fp-client" "$prefix-fp-node" "$prefix-fp-ep"; do
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap cleanup EXIT
# In the background so that a signal to this script interrupts the wait at once; the
# benchmark is stopped by its PID, then the EXIT trap removes its namespaces.
./target/release/ferry lab --prefix "$prefix" bench-first-packet "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; exit 130' INT TERM
wait "$child"
