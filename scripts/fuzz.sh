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
# address. FUZZ_JOBS targets run at once (default: the number of cores).
#
#   [FUZZ_SANITIZER=none] [FUZZ_JOBS=N] scripts/fuzz.sh [SECONDS] [TARGET...]
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

# The vsock target's sockets live in a dir per fuzz process, which libFuzzer's
# exit() never removes: give the runs a temp dir of their own, removed here.
fuzz_tmp="$(mktemp -d -t microvm-fuzz-run.XXXXXX)"
trap 'rm -rf "$fuzz_tmp"' EXIT
export TMPDIR="$fuzz_tmp"

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# One target: its log, and on a crash its inputs copied to regressions/.
# Writes the target's summary line to artifacts/<target>/summary; exits
# non-zero on a crash.
fuzz_target() {
    local target=$1 corpus="corpus/$1" log="artifacts/$1/last-run.log" status=0 runs
    mkdir -p "$corpus" "artifacts/$target" "regressions/$target" "seeds/$target"
    rm -f "artifacts/$target/summary"
    echo "== $target: ${seconds}s" >&2
    # Seeds and regressions are read-only inputs: new ones go to $corpus.
    cargo fuzz run "${flags[@]}" "$target" "$corpus" "seeds/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
    if [ "$status" -ne 0 ]; then
        for crash in artifacts/"$target"/crash-* artifacts/"$target"/timeout-* artifacts/"$target"/oom-*; do
            [ -e "$crash" ] || continue
            cp "$crash" "regressions/$target/"
            echo "fuzz.sh: $target: saved $(basename "$crash") to fuzz/regressions/$target/" >&2
        done
        tail -40 "$log" >&2
    fi
    printf '%-20s %12s executions  %s\n' "$target" "${runs:-?}" \
        "$([ "$status" -eq 0 ] && echo ok || echo "FAILED (status $status)")" >"artifacts/$target/summary"
    return "$status"
}

# FUZZ_JOBS targets at once (default: one per core): each libFuzzer run is
# single-threaded, so CI's 30 s per target costs 30 s per core.
jobs="${FUZZ_JOBS:-$(nproc)}"
running=0
for target in "${targets[@]}"; do
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    fuzz_target "$target" &
    running=$((running + 1))
done
wait || true

failed=()
for target in "${targets[@]}"; do
    summary="artifacts/$target/summary"
    [ -s "$summary" ] || printf '%-20s %12s executions  FAILED (no result)\n' "$target" "?" >"$summary"
    cat "$summary"
    grep -q ' ok$' "$summary" || failed+=("$target")
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs saved under fuzz/regressions/)" >&2
    exit 1
fi
