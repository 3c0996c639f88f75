#!/usr/bin/env bash
# BGP failover benchmark (issue 10): the client-visible outage when a node dies (its link is
# cut), with the router (BIRD 2, ECMP over two nodes, `merge paths on`) learning it by
#   ferry-bfd   ferry agents announcing, BFD 100 ms x 3 (a BFDProfile; BIRD `bfd on`)
#   bird-bfd    a BIRD 2 on each node announcing instead of ferry, the same BFD timers
#   ferry-hold  ferry agents, no BFD, hold time 3 s (failure found by the hold timer)
# Each trial: both nodes announce the address (10.99.0.10, also on each node's lo so that
# the node answers ping), a client behind the router pings it every 10 ms; the node the
# router's FIB sends the client's flow to has its link cut (`ip link set eth0 down` in the
# node); the outage is the longest time between two replies the client got (less the 10 ms
# interval). Then the link comes back and
# the sessions settle before the next trial. Prints every trial and the medians.
#
# Namespaces `bgpf<PID>-*`, removed afterwards; daemons killed by PID.
# Needs root, bird2, ping (iputils). Uses target/debug/ferry (built here; FERRY=path to use
# another build).
# Usage: bench/bgp-failover.sh [TRIALS (20)] [MODES (ferry-bfd bird-bfd ferry-hold)]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-20}
shift || true
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(ferry-bfd bird-bfd ferry-hold)
for c in bird birdc ping; do
  command -v $c >/dev/null || { echo "$c is not installed (scripts/install-deps.sh)" >&2; exit 1; }
done
if [ -z "${FERRY:-}" ]; then
  cargo build -q -p ferry
  FERRY=$PWD/target/debug/ferry
fi
VIP=10.99.0.10
p=bgpf$$
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in n1 n2 c r; do ip netns del "$p-$ns" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

stop_all() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}

# The lab: client -- router (br0) -- n1, n2.
for ns in r c n1 n2; do ip netns add "$p-$ns"; ip -n "$p-$ns" link set lo up; done
ip -n "$p-r" link add br0 type bridge
ip -n "$p-r" link set br0 up
ip -n "$p-r" addr add 10.97.0.1/24 dev br0
ip -n "$p-r" link add c0 type veth peer name eth0 netns "$p-c"
ip -n "$p-r" link set c0 up
ip -n "$p-r" addr add 10.98.0.1/24 dev c0
ip -n "$p-c" link set eth0 up
ip -n "$p-c" addr add 10.98.0.2/24 dev eth0
ip -n "$p-c" route add default via 10.98.0.1
ip netns exec "$p-r" sysctl -qw net.ipv4.ip_forward=1
for i in 1 2; do
  ip -n "$p-r" link add v$i type veth peer name eth0 netns "$p-n$i"
  ip -n "$p-r" link set v$i master br0 up
  ip -n "$p-n$i" link set eth0 up
  ip -n "$p-n$i" addr add 10.97.0.1$i/24 dev eth0
  ip -n "$p-n$i" addr add $VIP/32 dev lo
  ip -n "$p-n$i" route add default via 10.97.0.1
done

router_conf() { # $1: bfd (1/0), $2: hold time
  local i
  cat <<EOF
router id 10.97.0.1;
protocol device { scan time 10; }
protocol kernel { ipv4 { export all; import none; }; merge paths on; }
EOF
  [ "$1" = 1 ] && echo 'protocol bfd { interface "br0" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }'
  for i in 1 2; do
    cat <<EOF
protocol bgp n$i {
  local 10.97.0.1 as 64600; neighbor 10.97.0.1$i as 64601;
  hold time $2; keepalive time 1; connect delay time 1; connect retry time 1; error wait time 1, 2;
  $([ "$1" = 1 ] && echo "bfd on;")
  ipv4 { import all; export none; };
}
EOF
  done
}

node_bird_conf() { # $1: node index
  cat <<EOF
router id 10.97.0.1$1;
protocol device { scan time 10; }
protocol static vip { ipv4; route $VIP/32 blackhole; }
protocol bfd { interface "eth0" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }
protocol bgp r {
  local 10.97.0.1$1 as 64601; neighbor 10.97.0.1 as 64600;
  hold time 9; connect delay time 1; connect retry time 1; error wait time 1, 2;
  bfd on;
  ipv4 { import none; export all; next hop self; };
}
EOF
}

manifests() { # $1: bfd (1/0), $2: hold time
  local extra="" i
  [ "$1" = 1 ] && extra=", bfdProfile: fast"
  cat <<EOF
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: bgp, namespace: metallb-system}
spec: {addresses: [$VIP/32]}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {name: bgp, namespace: metallb-system}
spec: {ipAddressPools: [bgp]}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: router, namespace: metallb-system}
spec: {myASN: 64601, peerASN: 64600, peerAddress: 10.97.0.1, holdTime: ${2}s$extra}
---
apiVersion: metallb.io/v1beta1
kind: BFDProfile
metadata: {name: fast, namespace: metallb-system}
spec: {receiveInterval: 100, transmitInterval: 100, detectMultiplier: 3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {type: LoadBalancer, externalTrafficPolicy: Cluster, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.97.0.11], nodeName: n1, conditions: {ready: true}}
- {addresses: [10.97.0.12], nodeName: n2, conditions: {ready: true}}
ports: [{port: 8080, protocol: TCP}]
EOF
  for i in 1 2; do
    printf -- '---\napiVersion: v1\nkind: Node\nmetadata: {name: n%s}\nstatus: {addresses: [{type: InternalIP, address: 10.97.0.1%s}]}\n' $i $i
  done
}

nexthops() { ip -n "$p-r" route show $VIP | grep -o 'via [0-9.]*' | sort | tr '\n' ' '; }

wait_both() { # up to 30 s for the ECMP route over both nodes
  for _ in $(seq 300); do
    [ "$(nexthops)" = "via 10.97.0.11 via 10.97.0.12 " ] && return 0
    sleep 0.1
  done
  echo "no ECMP route over both nodes: $(ip -n "$p-r" route show $VIP)" >&2
  for f in "$dir"/*.log "$dir"/*.err; do [ -f "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done >&2
  return 1
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR == 0) print "-"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

declare -A results
for mode in "${modes[@]}"; do
  stop_all
  case $mode in
    ferry-bfd) bfd=1; hold=9 ;;
    bird-bfd) bfd=1; hold=9 ;;
    ferry-hold) bfd=0; hold=3 ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
  router_conf $bfd $hold >"$dir/r.conf"
  ip netns exec "$p-r" bird -f -c "$dir/r.conf" -s "$dir/r.ctl" -P "$dir/r.pid" 2>"$dir/r.err" &
  pids+=($!)
  for i in 1 2; do
    if [ $mode = bird-bfd ]; then
      node_bird_conf $i >"$dir/n$i.conf"
      ip netns exec "$p-n$i" bird -f -c "$dir/n$i.conf" -s "$dir/n$i.ctl" -P "$dir/n$i.pid" 2>"$dir/n$i.err" &
      pids+=($!)
    else
      mkdir -p "$dir/m" "$dir/s$i"
      manifests $bfd $hold >"$dir/m/all.yaml"
      ip netns exec "$p-n$i" sysctl -qw net.ipv4.ip_forward=1
      ip netns exec "$p-n$i" "$FERRY" agent --no-l2 --manifests "$dir/m" --state-dir "$dir/s$i" \
        --node n$i --metrics-addr 127.0.0.1:10249 >>"$dir/n$i.log" 2>&1 &
      pids+=($!)
    fi
  done
  results[$mode]=""
  for t in $(seq "$trials"); do
    wait_both
    # BFD Up at the fast rate before cutting.
    [ $bfd = 1 ] && sleep 2 || sleep 1
    via=$(ip -n "$p-r" route get $VIP from 10.98.0.2 iif c0 | grep -o 'via [0-9.]*' | cut -d' ' -f2)
    victim=${via##*.}; victim=${victim#1}
    ip netns exec "$p-c" ping -D -n -i 0.01 -W 1 -w 15 $VIP >"$dir/ping" 2>&1 &
    ping_pid=$!
    sleep 1
    ip -n "$p-n$victim" link set eth0 down
    # Wait until the router's route no longer has the victim (or 12 s).
    for _ in $(seq 1200); do
      case "$(nexthops)" in *"via $via "*) sleep 0.01 ;; *) break ;; esac
    done
    sleep 1
    kill -INT $ping_pid 2>/dev/null || true
    wait $ping_pid 2>/dev/null || true
    # The longest time between two replies (ping -D: receive timestamps), less the 10 ms
    # interval; the lost sequence numbers for comparison.
    out=$(grep -o '^\[[0-9.]*\]' "$dir/ping" | tr -d '[]' |
      awk 'NR > 1 && $1 - prev > max {max = $1 - prev} {prev = $1} END {printf "%d", (max - 0.01) * 1000}')
    lost=$(grep -o 'icmp_seq=[0-9]*' "$dir/ping" | cut -d= -f2 |
      awk 'NR > 1 && $1 - prev > max {max = $1 - prev} {prev = $1} END {print max - 1}')
    echo "$mode trial $t: node $victim cut, outage ${out} ms ($lost replies missing in a row)"
    results[$mode]+="$out "
    ip -n "$p-n$victim" link set eth0 up
    ip -n "$p-n$victim" route replace default via 10.97.0.1
  done
done
stop_all
echo
echo "median client-visible outage (ms), $trials trial(s) each:"
for mode in "${modes[@]}"; do
  printf '  %-11s %s\n' "$mode" "$(echo "${results[$mode]}" | tr ' ' '\n' | grep . | median)"
done
