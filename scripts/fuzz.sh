#!/usr/bin/env bash
# Fuzzes ferry's readers of outside input (cargo fuzz, libFuzzer): the manifest reader
# (`manifest`), MetalLB's legacy ConfigMap (`metallb_config`), the ARP/NDP codec (`arp`,
# `ndp`, `l2_frame`), the BGP codec and session (`bgp_message`) and the BFD codec and session
# (`bfd_packet`); see fuzz/fuzz_targets/.
# Each target runs for SECONDS (default 20) from the
# corpus kept in fuzz/corpus/TARGET/. A panic, a hang (an input taking over 10 s) or memory
# past 1 GiB fails the run: the script goes on with the other targets, then prints each
# reproducer (fuzz/artifacts/TARGET/...) with the command that replays it, and exits 1.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_MERGE=1 scripts/fuzz.sh 300   # also add inputs that reach new code to fuzz/corpus/
#
# Without FUZZ_MERGE the repository is left as it was: new inputs go to a temporary directory.
#
# Built with `--sanitizer none`, which works on the stable toolchain as it is: the code fuzzed
# is safe Rust (no `unsafe` in ferry-source, ferry-model, ferry-l2's packet module or
# ferry-bgp's packet and session modules), so
# AddressSanitizer (cargo fuzz's default; it needs nightly flags, RUSTC_BOOTSTRAP=1 on stable)
# would find nothing more and slow every execution. Debug assertions and overflow checks are on.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${1:-20}
shift || true
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi

# libfuzzer-sys compiles libFuzzer (C++).
if ! command -v c++ >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++
    else
        echo "fuzz: needs a C++ compiler for libFuzzer (apt-get install g++)" >&2
        exit 1
    fi
fi
if ! cargo fuzz --version 2>/dev/null | grep -qxF "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi

flags=(--sanitizer none --debug-assertions)
cargo fuzz build "${flags[@]}"

if (($#)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "$work/$t"
    log="$work/$t.log"
    # New inputs go to the first corpus directory (temporary); the kept corpus is only read.
    # -timeout: an input taking longer is a hang; -rss_limit_mb: memory past it is a failure.
    if cargo fuzz run "${flags[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 \
        -print_final_stats=1 >"$log" 2>&1; then
        stat() { sed -n "s/^stat::$1: *//p" "$log"; }
        cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2 || true)
        echo "fuzz $t: ok, $(stat number_of_executed_units) inputs in ${seconds} s" \
            "($(stat average_exec_per_sec)/s), ${cov:-?} edges covered," \
            "$(stat new_units_added) new inputs, slowest $(stat slowest_unit_time_sec) s," \
            "peak RSS $(stat peak_rss_mb) MB"
    else
        echo "fuzz $t: FAILED" >&2
        # The panic message (or libFuzzer's report of a hang or of memory), then the input.
        grep -A 12 -E "panicked at|ERROR: libFuzzer|SUMMARY: libFuzzer" "$log" | head -n 40 >&2 \
            || tail -n 40 "$log" >&2
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        artifact=${artifact#"$PWD/"}
        if [ -n "$artifact" ]; then
            echo "reproducer: $artifact" >&2
            echo "replay:     cargo fuzz run ${flags[*]} $t $artifact" >&2
        else
            echo "(no reproducer written; full log above)" >&2
        fi
        failed+=("$t")
    fi
    if [ -n "${FUZZ_MERGE:-}" ]; then
        # Add the fewest inputs that reach code (edges: no hit counts, no comparison operands)
        # the kept corpus does not: the corpus stays small enough to keep in git.
        cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "$work/$t" -- -set_cover_merge=1 \
            -use_counters=0 -use_cmp=0 >"$work/$t.merge.log" 2>&1
        echo "fuzz $t: corpus $(find "fuzz/corpus/$t" -type f | wc -l) files," \
            "$(find "fuzz/corpus/$t" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }') bytes"
    fi
done

if ((${#failed[@]})); then
    echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi
