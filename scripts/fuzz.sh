#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 30) and
# prints the executions per target. A crash is copied into
# fuzz/regressions/<target>/, where `cargo test -p microvm-devices` replays it
# from then on (microvm_devices::fuzz tests); the script then exits 1.
#
# Each run starts by executing every seed and every saved regression input
# (fuzz/seeds/<target>, fuzz/regressions/<target>), so a fixed crash that
# comes back fails here too.
#
# Only the stable toolchain exists here: cargo-fuzz's -Z flags are allowed
# through RUSTC_BOOTSTRAP=1. FUZZ_SANITIZER=none builds without ASan (CI,
# for time: the targets are safe Rust over plain memory); the default is
# address.
#
#   [FUZZ_SANITIZER=none] scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail

seconds="${1:-30}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
flags=(-O --debug-assertions --sanitizer "${FUZZ_SANITIZER:-address}")

cargo fuzz build "${flags[@]}"

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

failed=()
summary=()
for target in "${targets[@]}"; do
    corpus="corpus/$target"
    mkdir -p "$corpus" "artifacts/$target" "regressions/$target"
    log="artifacts/$target/last-run.log"
    echo "== $target: ${seconds}s" >&2
    status=0
    # Seeds and regressions are read-only inputs: new ones go to $corpus.
    mkdir -p "seeds/$target"
    cargo fuzz run "${flags[@]}" "$target" "$corpus" "seeds/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        for crash in artifacts/"$target"/crash-* artifacts/"$target"/timeout-* artifacts/"$target"/oom-*; do
            [ -e "$crash" ] || continue
            cp "$crash" "regressions/$target/"
            echo "fuzz.sh: $target: saved $(basename "$crash") to fuzz/regressions/$target/" >&2
        done
        tail -40 "$log" >&2
    fi
    summary+=("$(printf '%-20s %12s executions  %s' "$target" "${runs:-?}" \
        "$([ "$status" -eq 0 ] && echo ok || echo "FAILED (status $status)")")")
done

printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs saved under fuzz/regressions/)" >&2
    exit 1
fi
