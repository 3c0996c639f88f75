#!/usr/bin/env bash
# BGP announcement benchmark (not a timed test): how fast N host routes (default 10,000 /32s)
# reach a BIRD 2 router from ferry's speaker (ferry-bgp-peer, release build), and, as the
# anchor, from a second BIRD with the same routes as static routes. In a router namespace and a
# node namespace of its own (prefix `bgpb<PID>`, removed afterwards, daemons killed by PID).
#
# For each trial and speaker: the session comes up; then the times from BIRD's "Established" to
# all N routes in BIRD's table, by BIRD's own clock (the session's "Since" to the newest route's
# import time, in ms: the exact figure) and polled (`birdc show route count`, which waits while
# BIRD is busy), and to all N in the router's kernel FIB (`ip route show proto bird`, polled);
# then SIGTERM and the time until both are empty again (polled). Polling every ~10 ms plus the
# time a count takes, so polled figures are coarse (tens of ms).
#
# Needs root and bird2 (scripts/install-deps.sh).
# Usage: bench/bgp.sh [ROUTES (10000)] [TRIALS (3)]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
trials=${2:-3}
if ! command -v bird >/dev/null; then
  echo "bird2 is not installed: apt-get install -y bird2" >&2
  exit 1
fi
cargo build --release -q -p ferry-bgp --bin ferry-bgp-peer
bin=$PWD/target/release/ferry-bgp-peer

p=bgpb$$
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$p-n" 2>/dev/null || true
  ip netns del "$p-r" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

ip netns add "$p-r"
ip netns add "$p-n"
ip -n "$p-r" link set lo up
ip -n "$p-n" link set lo up
ip -n "$p-r" link add eth0 type veth peer name eth0 netns "$p-n"
ip -n "$p-r" addr add 10.96.0.1/24 dev eth0
ip -n "$p-n" addr add 10.96.0.11/24 dev eth0
ip -n "$p-r" link set eth0 up
ip -n "$p-n" link set eth0 up

cat >"$dir/router.conf" <<EOF
router id 10.96.0.1;
protocol device { scan time 10; }
protocol kernel { ipv4 { export all; import none; }; merge paths on; }
protocol bgp node {
  local 10.96.0.1 as 64600; neighbor 10.96.0.11 as 64601;
  hold time 90; connect delay time 1; connect retry time 1; error wait time 1, 2;
  ipv4 { import all; export none; };
}
EOF
ip netns exec "$p-r" bird -f -c "$dir/router.conf" -s "$dir/router.ctl" -P "$dir/router.pid" \
  2>"$dir/router.err" &
pids+=($!)
for _ in $(seq 100); do birdc -s "$dir/router.ctl" show status >/dev/null 2>&1 && break; sleep 0.05; done

# The anchor: BIRD in the node with the same N /32s as static routes.
{
  echo "router id 10.96.0.11;"
  echo "protocol device {}"
  echo "protocol static { ipv4;"
  python3 -c "
import ipaddress
base = int(ipaddress.IPv4Address('10.97.0.0'))
for i in range($n):
    print('  route %s/32 blackhole;' % ipaddress.IPv4Address(base + i))
"
  echo "}"
  echo "protocol bgp uplink {"
  echo "  local 10.96.0.11 as 64601; neighbor 10.96.0.1 as 64600;"
  echo "  hold time 90; connect delay time 1; connect retry time 1;"
  echo "  ipv4 { import none; export all; };"
  echo "}"
} >"$dir/node.conf"

now() { date +%s.%N; }
count_bird() {
  birdc -s "$dir/router.ctl" show route count 2>/dev/null |
    sed -n 's/^\([0-9]*\) of .* in table master4.*/\1/p' | head -n 1
}
count_kernel() { ip -n "$p-r" route show proto bird | grep -c '^10\.97\.' || true; }
established() { birdc -s "$dir/router.ctl" show protocols node 2>/dev/null | grep -q Established; }

# One trial: $1 = name; the speaker is started by the caller, its PID in $speaker.
measure() {
  local name=$1 t0 te tb="" tk="" b k
  t0=$(now)
  until established; do
    if (( $(echo "$(now) - $t0 > 30" | bc) )); then
      echo "$name: no session in 30 s" >&2
      cat "$dir"/*.err >&2
      birdc -s "$dir/router.ctl" show protocols all node >&2 || true
      return 1
    fi
    sleep 0.01
  done
  te=$(now)
  while [ -z "$tb" ] || [ -z "$tk" ]; do
    # Each count is timed as it returns (a count of 10,000 routes takes some milliseconds).
    b=$(count_bird)
    [ -z "$tb" ] && [ "${b:-0}" -ge "$n" ] && tb=$(now)
    k=$(count_kernel)
    [ -z "$tk" ] && [ "${k:-0}" -ge "$n" ] && tk=$(now)
    if (( $(echo "$(now) - $te > 120" | bc) )); then echo "$name: routes missing after 120 s" >&2; return 1; fi
    sleep 0.01
  done
  # BIRD's own clock (ms): the session's "Since" and the newest route's import time.
  local since last
  since=$(birdc -s "$dir/router.ctl" show protocols node | awk '$1 == "node" { print $5 }')
  last=$(birdc -s "$dir/router.ctl" show route | grep -o '\[node [0-9:.]*' | awk '{ print $2 }' | sort | tail -n 1)
  local tbird
  tbird=$(awk -v a="$since" -v b="$last" 'BEGIN { split(a, x, ":"); split(b, y, ":");
    print ((y[1] - x[1]) * 3600 + (y[2] - x[2]) * 60 + (y[3] - x[3])) * 1000 }')
  kill -TERM "$speaker"
  local ts tbw="" tkw=""
  ts=$(now)
  while [ -z "$tbw" ] || [ -z "$tkw" ]; do
    b=$(count_bird)
    [ -z "$tbw" ] && [ "${b:-0}" -eq 0 ] && tbw=$(now)
    k=$(count_kernel)
    [ -z "$tkw" ] && [ "${k:-0}" -eq 0 ] && tkw=$(now)
    if (( $(echo "$(now) - $ts > 120" | bc) )); then echo "$name: routes left after 120 s" >&2; return 1; fi
    sleep 0.01
  done
  wait "$speaker" 2>/dev/null || true
  echo "$name $(echo "($tb - $te) * 1000" | bc) $(echo "($tk - $te) * 1000" | bc) $(echo "($tbw - $ts) * 1000" | bc) $(echo "($tkw - $ts) * 1000" | bc) $tbird" >>"$dir/results"
  awk -v name="$name" -v n="$n" -v te="$te" -v tb="$tb" -v tk="$tk" -v ts="$ts" -v tbw="$tbw" -v tkw="$tkw" -v tbird="$tbird" 'BEGIN {
    printf "%-6s %6d routes: by BIRD'"'"'s clock %5.0f ms (%6.0f routes/s); polled: in BIRD %5.0f ms, in the kernel FIB %5.0f ms (%6.0f routes/s); SIGTERM: gone from BIRD %4.0f ms, from the FIB %4.0f ms\n",
      name, n, tbird, n / tbird * 1000, (tb-te)*1000, (tk-te)*1000, n/(tk-te), (tbw-ts)*1000, (tkw-ts)*1000 }'
  # BIRD waits (error wait time) before it takes the next session.
  sleep 2.5
}

echo "== $n /32 routes, $trials trials each, to BIRD $(bird --version 2>&1 | awk '{print $NF}')"
for t in $(seq "$trials"); do
  ip netns exec "$p-n" "$bin" --local-asn 64601 --router-id 10.96.0.11 --peer 10.96.0.1,64600 \
    --connect-retry 1 --route 10.97.0.0/32 --count "$n" >"$dir/ferry.log" 2>&1 &
  speaker=$!
  pids+=("$speaker")
  measure ferry
  ip netns exec "$p-n" bird -f -c "$dir/node.conf" -s "$dir/node.ctl" -P "$dir/node.pid" \
    2>"$dir/node.err" &
  speaker=$!
  pids+=("$speaker")
  measure bird
done

# Medians over the trials (the polling makes single figures noisy).
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "== medians of $trials trials, $n routes"
for name in ferry bird; do
  col() { awk -v name="$name" -v c="$1" '$1 == name { print $c }' "$dir/results" | median; }
  b=$(col 2) k=$(col 3) bw=$(col 4) kw=$(col 5) bc=$(col 6)
  awk -v name="$name" -v n="$n" -v b="$b" -v k="$k" -v bw="$bw" -v kw="$kw" -v bc="$bc" 'BEGIN {
    printf "%-6s by BIRD'"'"'s clock %5.0f ms (%6.0f routes/s); polled: in BIRD %5.0f ms, in the kernel FIB %5.0f ms (%6.0f routes/s); SIGTERM: gone from BIRD %4.0f ms, from the FIB %4.0f ms\n",
      name, bc, n / bc * 1000, b, k, n / k * 1000, bw, kw }'
done
