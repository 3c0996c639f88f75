#!/usr/bin/env bash
# Failover benchmark (not a timed test): client-visible failover time of a LoadBalancer address
# (owner's link down -> the client's first successful request), 20 trials each, for keepalived
# (VRRP v3, advert_int 0.1: the anchor) and for ferry's layer-2 announcement, each in a fresh
# 3-node lab (prefix `fo`, removed afterwards). Method: crates/ferry-lab/src/failover.rs.
# Needs root and keepalived (scripts/install-deps.sh). Target: p99 under 500 ms.
# Usage: bench/failover.sh [bench-failover flags, e.g. --trials 5 --prefix fo2]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v keepalived >/dev/null && [ ! -x /usr/sbin/keepalived ]; then
  echo "keepalived is not installed: apt-get install -y keepalived" >&2
  exit 1
fi
cargo build --release -q -p ferry -p ferry-lab
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
summaries=()
for mode in keepalived ferry; do
  echo "== $mode"
  if ! ./target/release/ferry lab bench-failover --mode "$mode" "$@" | tee "$log"; then
    rc=1
  fi
  summaries+=("$(grep '^failover (' "$log" || echo "failover ($mode): no summary (the run failed)")")
  echo
done
echo "== summary"
printf '%s\n' "${summaries[@]}"
exit "$rc"
