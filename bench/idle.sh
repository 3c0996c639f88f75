#!/usr/bin/env bash
# Idle benchmark: CPU and memory of one `ferry agent` that has nothing to do, with 1,000
# services, in a network namespace of its own (removed on exit, with the agent and the files).
# The namespace holds a veth pair (eth0 192.168.2.11/24 and its peer, both inside) so that the
# agent runs as on a node: its Node object `n1` gives it that address, it gossips (a cluster of
# one) and announces the LoadBalancer addresses on eth0.
# The services: every 100th LoadBalancer (a MetalLB layer-2 pool), every 10th NodePort, the
# rest ClusterIP; each with an EndpointSlice of E ready endpoints (3 unless --endpoints); one file per object, as
# `ferry lab` lays them out.
# Method: start the agent, wait for its first sync ("N services: ..." in its log) and SETTLE
# seconds more (the address announcements' bursts), then read /proc/PID/stat (utime + stime, all
# threads) at the start and the end of SECONDS seconds, and /proc/PID/status VmRSS every second.
# Goal (issue 6): under 0.5% of one core, RSS under 20 MiB.
# Also reported: the peak RSS (VmHWM: the first sync's high-water mark, with everything read).
# Needs root. Usage: bench/idle.sh [--services N] [--endpoints E] [--seconds S] [--settle S]
# [--exe PATH] [--heaptrack FILE] [--nft-shards N]
# (without --exe: builds and measures target/release/ferry).
# --heaptrack FILE: runs the agent under heaptrack (FILE.zst), ends it with SIGKILL after the
# measurement and prints what it held then (heaptrack_print's "leaked"); the agent uses the C
# library's malloc then (FERRY_MALLOC=system: heaptrack sees only malloc).
# --nft-shards N: the agent's --nft-shards (default: its automatic count, 16 at 10,000
# services; 1 for one table).
set -euo pipefail
cd "$(dirname "$0")/.."

services=1000
endpoints=3
seconds=60
settle=3
exe=""
heaptrack=""
shards=""
while [ $# -gt 0 ]; do
  case "$1" in
    --services) services="$2"; shift 2 ;;
    --endpoints) endpoints="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --settle) settle="$2"; shift 2 ;;
    --exe) exe="$2"; shift 2 ;;
    --heaptrack) heaptrack="$2"; shift 2 ;;
    --nft-shards) shards="$2"; shift 2 ;;
    *) echo "bench/idle.sh: unknown argument $1 (--services N, --endpoints E, --seconds S, --settle S, --exe PATH, --heaptrack FILE, --nft-shards N)" >&2; exit 2 ;;
  esac
done
for v in "$services" "$endpoints" "$seconds" "$settle" "${shards:-0}"; do
  case "$v" in
    ''|*[!0-9]*) echo "bench/idle.sh: $v is not a whole number" >&2; exit 2 ;;
  esac
done
if [ "$services" -lt 1 ] || [ "$services" -gt 20000 ] || [ "$seconds" -lt 1 ] ||
  [ "$endpoints" -lt 1 ] || [ "$endpoints" -gt 100 ]; then
  echo "bench/idle.sh: --services must be 1..20000, --endpoints 1..100, --seconds at least 1" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "bench/idle.sh: needs root (network namespaces)" >&2
  exit 1
fi
if [ -z "$exe" ]; then
  cargo build --release -q -p ferry
  exe=./target/release/ferry
fi
exe=$(realpath "$exe")
agent_args=()
if [ -n "$shards" ]; then agent_args=(--nft-shards "$shards"); fi

ns="ferry-idle-$$"
dir=$(mktemp -d /tmp/ferry-idle.XXXXXX)
pid=""
hpid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  if [ -n "$hpid" ]; then wait "$hpid" 2>/dev/null || true; fi
  ip netns del "$ns" 2>/dev/null || true
  if [ -n "${KEEP_LOG:-}" ]; then cp "$dir/agent.log" "$KEEP_LOG" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

# The manifests.
m="$dir/manifests"
mkdir -p "$m" "$dir/state"
cat >"$m/node-n1.yaml" <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: n1
  labels:
    kubernetes.io/hostname: n1
spec:
  podCIDR: 10.42.0.0/24
status:
  addresses:
  - type: InternalIP
    address: 192.168.2.11
EOF
cat >"$m/metallb-config.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  namespace: metallb-system
  name: config
data:
  config: |
    address-pools:
    - name: default
      protocol: layer2
      addresses:
      - 192.168.2.200-192.168.2.254
EOF
for ((i = 0; i < services; i++)); do
  name=$(printf 'svc-%05d' "$i")
  if ((i % 100 == 0)); then type=LoadBalancer; elif ((i % 10 == 0)); then type=NodePort; else type=ClusterIP; fi
  printf 'apiVersion: v1\nkind: Service\nmetadata:\n  name: %s\n  namespace: default\nspec:\n  type: %s\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n' \
    "$name" "$type" >"$m/service-default-$name.yaml"
  {
    printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: %s-idle\n  namespace: default\n  labels:\n    kubernetes.io/service-name: %s\naddressType: IPv4\nendpoints:\n' \
      "$name" "$name"
    for ((e = 0; e < endpoints; e++)); do
      k=$((i * endpoints + e))
      printf -- '- addresses: ["10.%d.%d.%d"]\n  conditions: {ready: true}\n  nodeName: n1\n' $((42 + k / 50000)) $((k / 250 % 200)) $((k % 250 + 2))
    done
    printf 'ports:\n- name: http\n  protocol: TCP\n  port: 8080\n'
  } >"$m/endpointslice-default-$name.yaml"
done

# The namespace: lo, and a veth pair whose eth0 holds the node's address.
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add eth0 type veth peer name eth1
ip -n "$ns" addr add 192.168.2.11/24 dev eth0
ip -n "$ns" link set eth0 up
ip -n "$ns" link set eth1 up
ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1

# The agent (`ip netns exec` execs it: $! is the agent's PID).
log="$dir/agent.log"
if [ -n "$heaptrack" ]; then
  # heaptrack's script runs the agent as its child: the agent's PID is that child's.
  FERRY_MALLOC=system ip netns exec "$ns" heaptrack -o "$heaptrack" "$exe" agent --manifests "$m" --node n1 \
    --state-dir "$dir/state" "${agent_args[@]}" >"$log" 2>&1 &
  hpid=$!
  for _ in $(seq 100); do
    pid=$(awk -v p="$hpid" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null |
      while read -r c; do [ "$(readlink "/proc/$c/exe" 2>/dev/null)" = "$exe" ] && echo "$c"; done | head -1)
    [ -n "$pid" ] && break
    sleep 0.1
  done
  if [ -z "$pid" ]; then
    echo "the agent did not start under heaptrack; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
else
  ip netns exec "$ns" "$exe" agent --manifests "$m" --node n1 --state-dir "$dir/state" "${agent_args[@]}" >"$log" 2>&1 &
  pid=$!
fi
echo "agent: pid $pid in namespace $ns, $services services ($(find "$m" -type f | wc -l) files in $m)"

started=$EPOCHREALTIME
synced=""
while [ -z "$synced" ]; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "the agent exited before its first sync; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  synced=$(grep -m1 ' services: ' "$log" || true)
  if [ -z "$synced" ]; then
    if awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { exit !(b - a > 120) }'; then
      echo "no first sync within 120 s; the agent's log:" >&2
      cat "$log" >&2
      exit 1
    fi
    sleep 0.1
  fi
done
echo "first sync: $synced"
sleep "$settle"

hz=$(getconf CLK_TCK)
# utime + stime (fields 14 and 15; the command name in field 2 may hold spaces: cut after ')').
ticks() { sed 's/.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"; }

t0=$EPOCHREALTIME
c0=$(ticks)
rss=()
for ((s = 1; s <= seconds; s++)); do
  # Sleep until the next whole second from t0 (sampling does not drift).
  sleep "$(awk -v t0="$t0" -v s="$s" -v now="$EPOCHREALTIME" 'BEGIN { d = t0 + s - now; print (d > 0 ? d : 0) }')"
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "the agent exited during the measurement; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  rss+=("$(rss_kib)")
done
c1=$(ticks)
t1=$EPOCHREALTIME

cpu=$(awk -v c="$((c1 - c0))" -v hz="$hz" -v t0="$t0" -v t1="$t1" \
  'BEGIN { printf "%.2f", 100 * c / hz / (t1 - t0) }')
median_kib=$(printf '%s\n' "${rss[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
min_kib=$(printf '%s\n' "${rss[@]}" | sort -n | head -1)
max_kib=$(printf '%s\n' "${rss[@]}" | sort -n | tail -1)
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
echo "cpu: $((c1 - c0)) ticks of 1/$hz s in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s; RSS: ${#rss[@]} samples, min $(mib "$min_kib") MiB, max $(mib "$max_kib") MiB"
problems=$(grep -c -E 'error|warning' "$log" || true)
if [ "$problems" -gt 0 ]; then
  echo "the agent's log has $problems errors/warnings, e.g.:"
  grep -m5 -E 'error|warning' "$log" | sed 's/^/  /'
fi
echo "agent's log: $(grep -c 'announcing ' "$log" || true) addresses announced, $(grep -c 'membership: ' "$log" || true) membership lines, $(wc -l <"$log") lines"
hwm_kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
# RSS = the heap and stacks (anonymous) + the mapped binary and libraries (file).
echo "RSS now: $(awk '/^RssAnon:/ { a = $2 } /^RssFile:/ { f = $2 } END { printf "%.1f MiB anonymous, %.1f MiB file-backed", a / 1024, f / 1024 }' "/proc/$pid/status")"
echo "idle CPU: ${cpu}% of one core over ${seconds} s, RSS: $(mib "$median_kib") MiB (median of samples), peak RSS: $(mib "$hwm_kib") MiB ($services services x $endpoints endpoints)"
if [ -n "$heaptrack" ]; then
  kill -KILL "$pid"
  wait "$hpid" 2>/dev/null || true
  hpid=""
  pid=""
  out=$(ls -t "$heaptrack".zst "$heaptrack".gz 2>/dev/null | head -1 || true)
  echo "heaptrack: $out"
  heaptrack_print -f "$out" -l 1 -n 25 -s 0 -a 0 -T 0 2>/dev/null | sed -n '/MEMORY LEAKS/,$p' | head -60
fi
