#!/usr/bin/env bash
# Runs `ferry demo` on this machine: installs the packages it needs, builds, brings up a lab of
# network namespaces, replays the seed's walk through Service types, and tears the lab down.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "ferry demo creates network namespaces: run as root (sudo $0)" >&2
  exit 1
fi
scripts/install-deps.sh
cargo build --release -q -p ferry -p ferry-lab
exec ./target/release/ferry demo "$@"
