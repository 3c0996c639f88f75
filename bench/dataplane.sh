#!/usr/bin/env bash
# Dataplane benchmark: plan + apply 10,000 services x 10 endpoints from scratch, then one
# endpoint change at a time, in a network namespace of its own (removed on exit).
# Usage: bench/dataplane.sh [ferry bench flags, e.g. --services 1000 --kube-proxy-layout]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ferry -p ferry-lab
ns="ferry-bench-$$"
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
ip netns exec "$ns" ./target/release/ferry bench "$@"
