#!/usr/bin/env bash
# Cross-builds ferry for 64-bit ARM (Raspberry Pi 3/4/5 with a 64-bit OS) and smoke-tests it
# under QEMU user emulation: `ferry --version`, and `ferry plan` on the seed's manifests
# compared with the x86_64 build's output (they must be identical).
#
#   scripts/build-arm64.sh            # -> target/aarch64-unknown-linux-gnu/release/ferry
#
# Needs (Debian): rustup's aarch64-unknown-linux-gnu standard library, gcc-aarch64-linux-gnu
# (the linker, and the C compiler for ring), qemu-user-static (the smoke test). On a Pi itself
# no cross-compiling is needed: `cargo build --release -p ferry` there (apt-get install
# libnftables1 for the run).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    echo "build-arm64: installing the $TARGET standard library (rustup target add $TARGET)"
    if ! rustup target add "$TARGET"; then
        cat >&2 <<EOF
build-arm64: the standard library for $TARGET cannot be installed on this machine
(rustup could not fetch it). Build on the Raspberry Pi itself instead:
    curl https://sh.rustup.rs -sSf | sh      # once, on the Pi (64-bit OS)
    cargo build --release -p ferry
EOF
        exit 1
    fi
fi
for tool in aarch64-linux-gnu-gcc qemu-aarch64-static; do
    if ! command -v "$tool" >/dev/null; then
        echo "build-arm64: $tool is missing (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user-static)" >&2
        exit 1
    fi
done

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo build --release --target "$TARGET" -p ferry
cargo build --release -p ferry
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
ARM="$TARGET_DIR/$TARGET/release/ferry"
X86="$TARGET_DIR/release/ferry"
file "$ARM" 2>/dev/null || true

run_arm() { qemu-aarch64-static -L /usr/aarch64-linux-gnu "$ARM" "$@"; }

echo "--- ferry --version under qemu-aarch64:"
run_arm --version

# The seed's manifests, two nodes, one endpoint, and allocations as agents would have kept
# them (ferry plan only reads the state directory).
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/manifests" "$WORK/state"
cp crates/ferry-lab/manifests/seed/nextcloud-dev-*.yaml crates/ferry-lab/manifests/seed/metallb-config.yaml "$WORK/manifests/"
cat > "$WORK/manifests/cluster.yaml" <<'EOF'
apiVersion: v1
kind: Node
metadata: {name: k3s-master-rpi001}
status: {addresses: [{type: InternalIP, address: 192.168.2.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: k3s-worker-rpi002}
status: {addresses: [{type: InternalIP, address: 192.168.2.12}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: nextcloud-dev-clusterip-1
  labels: {kubernetes.io/service-name: nextcloud-dev-clusterip}
addressType: IPv4
endpoints: [{addresses: [10.42.1.5], nodeName: k3s-worker-rpi002, conditions: {ready: true}}]
ports: [{port: 80, protocol: TCP}]
EOF
cat > "$WORK/state/allocations.json" <<'EOF'
{"services": {
  "default/nextcloud-dev-clusterip": {"cluster_ip": "10.43.200.1", "updated_ms": 1},
  "default/nextcloud-dev-nodeport": {"cluster_ip": "10.43.200.2", "node_ports": {"80/TCP": 30080}, "updated_ms": 1},
  "default/nextcloud-dev-loadbalancer": {"cluster_ip": "10.43.200.3", "node_ports": {"80/TCP": 30081}, "updated_ms": 1}
}}
EOF
cat > "$WORK/state/lb-allocations.json" <<'EOF'
{"services": {"default/nextcloud-dev-loadbalancer": {"ips": ["192.168.2.200"], "pool": "default", "updated_ms": 1}}}
EOF
args=(plan --manifests "$WORK/manifests" --node k3s-master-rpi001 --state-dir "$WORK/state")
"$X86" "${args[@]}" > "$WORK/plan-x86_64.nft" 2>/dev/null
run_arm "${args[@]}" > "$WORK/plan-aarch64.nft" 2>/dev/null
if ! grep -q "192.168.2.200" "$WORK/plan-x86_64.nft"; then
    echo "build-arm64: the x86_64 plan lacks the seed's load-balancer address" >&2
    exit 1
fi
if cmp -s "$WORK/plan-x86_64.nft" "$WORK/plan-aarch64.nft"; then
    echo "--- ferry plan on the seed: aarch64 output identical to x86_64 ($(wc -l < "$WORK/plan-aarch64.nft") lines)"
else
    echo "build-arm64: ferry plan differs between aarch64 and x86_64:" >&2
    diff "$WORK/plan-x86_64.nft" "$WORK/plan-aarch64.nft" | head -40 >&2
    exit 1
fi
SIZE=$(stat -c %s "$ARM")
echo "built $ARM ($((SIZE / 1024)) KiB)"
