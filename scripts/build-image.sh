#!/usr/bin/env bash
# Builds ferry's container image (OCI) from scratch, pulling nothing: the `ferry` binary,
# exactly the shared libraries it loads (found with ldd, libnftables' own included, since
# ferry opens libnftables.so.1 at run time) and the CA certificates, nothing else. Debian's umoci assembles the
# image, skopeo exports it.
#
#   scripts/build-image.sh [--binary PATH] [--out DIR] [--tag TAG]
#
# Writes DIR/oci (an OCI layout: `podman run oci:DIR/oci:TAG ...`) and DIR/ferry-image.tar
# (a docker-archive named localhost/ferry:TAG, for `k3s ctr images import` or
# `docker load`). Default binary: a release build (`cargo build --release -p ferry`).
set -euo pipefail

cd "$(dirname "$0")/.."
BINARY=""
OUT="target/image"
TAG="0.1.0"
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) BINARY="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        *) echo "usage: $0 [--binary PATH] [--out DIR] [--tag TAG]" >&2; exit 2 ;;
    esac
done

for tool in umoci skopeo ldd strip; do
    if ! command -v "$tool" >/dev/null; then
        echo "build-image: $tool is missing (Debian: apt-get install umoci skopeo)" >&2
        exit 1
    fi
done

if [ -z "$BINARY" ]; then
    cargo build --release -p ferry
    BINARY="${CARGO_TARGET_DIR:-target}/release/ferry"
fi
[ -x "$BINARY" ] || { echo "build-image: no executable at $BINARY" >&2; exit 1; }

NFT_LIB=""
for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /lib/x86_64-linux-gnu /usr/lib64 /usr/lib; do
    if [ -e "$d/libnftables.so.1" ]; then NFT_LIB="$d/libnftables.so.1"; break; fi
done
[ -n "$NFT_LIB" ] || { echo "build-image: libnftables.so.1 not found (Debian: apt-get install libnftables1)" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
mkdir -p "$ROOTFS/tmp" "$ROOTFS/var/lib/ferry"
chmod 1777 "$ROOTFS/tmp"

# The files each library or program needs, by ldd: "name => /path (addr)" and "/path (addr)".
deps() { ldd "$1" | awk '/=>/ { if ($3 ~ /^\//) print $3; next } $1 ~ /^\// { print $1 }'; }

copy() {  # copies $1 to the same path in the image, as a file (symlinks resolved)
    local src="$1"
    mkdir -p "$ROOTFS$(dirname "$src")"
    cp -L "$src" "$ROOTFS$src"
}

# Debug information stays out of the image (the release profile keeps line tables).
strip -o "$ROOTFS/ferry" "$BINARY"
chmod 0755 "$ROOTFS/ferry"
{ deps "$BINARY"; echo "$NFT_LIB"; deps "$NFT_LIB"; } | sort -u | while read -r lib; do
    copy "$lib"
done
# CA certificates (as distroless images carry them): kube-rs's TLS reads the system's roots
# when a kubeconfig gives no CA of its own; in a pod the service account's CA is used.
if [ -e /etc/ssl/certs/ca-certificates.crt ]; then
    copy /etc/ssl/certs/ca-certificates.crt
else
    echo "build-image: no /etc/ssl/certs/ca-certificates.crt (Debian: apt-get install ca-certificates)" >&2
    exit 1
fi
# The dynamic loader is also found through /lib64 on x86_64.
if [ -e /lib64/ld-linux-x86-64.so.2 ] && [ ! -e "$ROOTFS/lib64/ld-linux-x86-64.so.2" ]; then
    copy /lib64/ld-linux-x86-64.so.2
fi

ARCH="$(uname -m)"
case "$ARCH" in x86_64) ARCH=amd64 ;; aarch64) ARCH=arm64 ;; esac

rm -rf "$OUT/oci" "$OUT/ferry-image.tar"
mkdir -p "$OUT"
umoci init --layout "$OUT/oci"
umoci new --image "$OUT/oci:$TAG"
umoci unpack --image "$OUT/oci:$TAG" "$WORK/bundle" >/dev/null
cp -a "$ROOTFS/." "$WORK/bundle/rootfs/"
umoci repack --image "$OUT/oci:$TAG" "$WORK/bundle"
umoci config --image "$OUT/oci:$TAG" \
    --architecture "$ARCH" --os linux \
    --config.entrypoint /ferry --config.cmd agent \
    --config.workingdir / \
    --config.label "org.opencontainers.image.title=ferry" \
    --config.label "org.opencontainers.image.description=Kubernetes Services for bare-metal clusters"
umoci gc --layout "$OUT/oci"
skopeo copy --quiet "oci:$OUT/oci:$TAG" "docker-archive:$OUT/ferry-image.tar:localhost/ferry:$TAG"

echo "image files:"
(cd "$ROOTFS" && find . -type f -printf '  /%P %s bytes\n' | sort)
SIZE=$(du -sb "$OUT/ferry-image.tar" | cut -f1)
echo "built localhost/ferry:$TAG ($ARCH): $OUT/oci, $OUT/ferry-image.tar ($((SIZE / 1024)) KiB)"
