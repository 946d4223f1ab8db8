#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs every test: formatting, lints,
# unit tests and the integration tests (KVM probe guest, guest image under
# QEMU+TCG). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Where the time goes, for CI's log: each step prints its start and the
# closing line prints every step's length.
steps=()
step_started=$SECONDS
step_name=""
step() {
  [ -n "$step_name" ] && steps+=("$(printf '%-14s %4ds' "$step_name" $((SECONDS - step_started)))")
  step_name=$1
  step_started=$SECONDS
  [ -n "$step_name" ] && echo "== $step_name: $2"
  return 0
}

step install "scripts/install-deps.sh"
scripts/install-deps.sh

# Cargo's build output lives in a cache outside the checkout when the
# checkout has none yet (CI's fresh clone): a cold build of the workspace and
# of the fuzz targets is most of this script's time. The cache is only ever
# build output; cargo's fingerprints decide what is stale. MICROVM_BUILD_CACHE
# moves it; empty turns it off.
build_cache=${MICROVM_BUILD_CACHE-/var/cache/microvm/build}
if [ -n "$build_cache" ]; then
  # A cache that outgrew the disk is dropped, never trusted half-written.
  if [ -d "$build_cache" ] && [ "$(df --output=avail -k "$build_cache" | tail -1)" -lt $((8 * 1024 * 1024)) ]; then
    echo "test.sh: less than 8 GiB free: removing the build cache $build_cache"
    rm -rf "$build_cache"
  fi
  for dir in target fuzz/target; do
    if [ ! -e "$dir" ]; then
      mkdir -p "$build_cache/$dir"
      ln -s "$build_cache/$dir" "$dir"
      echo "test.sh: $dir -> $build_cache/$dir"
    fi
  done
  # Incremental data is useless to a fresh clone and doubles the cache.
  export CARGO_INCREMENTAL=0
fi

# The probe guest is its own (no_std, excluded) package: cargo picks up its
# .cargo/config.toml only when run from its directory.
probe() {
  local subcommand=$1
  shift
  (cd vmm/probe-guest && cargo "$subcommand" --target-dir ../../target/probe-guest "$@")
}

step fmt "cargo fmt --check"
cargo fmt --all -- --check
(cd vmm/probe-guest && cargo fmt -- --check)

step clippy "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
probe clippy --all-targets --locked -- -D warnings

step build "binaries used by the integration tests"
cargo build --workspace --bins --locked

step guest-image "kernel + initramfs (cached outside the repo)"
cargo run --quiet --locked -p microvm-guest-image --bin microvm-image -- all

step tests "cargo test, with cri_pods in a stream of its own; then the fuzz targets"
# Everything is built first, so the two streams below only run tests.
cargo test --workspace --locked --lib --bins --tests --no-run
log=$(mktemp)
cri_log=$(mktemp)
trap 'rm -f "$log" "$cri_log"' EXIT
set +e
# Two streams at once: `cri_pods` (the longest: its nested-KVM L1 runs nine
# CRI cases) and everything else. An emulated L1 keeps about one core busy,
# so the other stream gets the second core. The `cri_pods` stream's lines
# are prefixed; its whole log is kept for the summaries. Its binary runs
# directly, from its package dir as cargo would: a `cargo test` holds the
# build directory's lock until its tests end.
cri_binary=$PWD/$(cargo test --locked -p microvm-tests --test cri_pods --no-run 2>&1 \
  | sed -n 's/^ *Executable .*(\(.*\))$/\1/p')
cri_started=$SECONDS
(
  set -o pipefail
  echo "     Running tests/cri_pods.rs (${cri_binary#"$PWD"/})" >"$cri_log"
  cd tests && "$cri_binary" --test-threads=2 2>&1 | tee -a "$cri_log" | sed -u 's/^/[cri_pods] /'
) &
cri_pid=$!
other_tests=()
for test in tests/tests/*.rs; do
  name=$(basename "$test" .rs)
  [ "$name" = cri_pods ] || other_tests+=(--test "$name")
done
cargo test --workspace --exclude microvm-tests --locked --no-fail-fast --lib --bins --tests \
  -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
cargo test -p microvm-tests --locked --no-fail-fast --lib --bins "${other_tests[@]}" \
  -- --test-threads=2 2>&1 | tee -a "$log"
other_status=${PIPESTATUS[0]}
((status == 0)) && status=$other_status
probe test --locked 2>&1 | tee -a "$log"
probe_status=${PIPESTATUS[0]}
((status == 0)) && status=$probe_status
other_seconds=$((SECONDS - cri_started))

# Every guest-facing parser's fuzz target for 15 s, after replaying its
# seeds and saved crash inputs, one target at a time (the L1 has the other
# core). Without ASan: the build is what costs here.
fuzz_started=$SECONDS
echo "== fuzz: every target for 15 s (scripts/fuzz.sh)"
FUZZ_SANITIZER=none FUZZ_JOBS=1 scripts/fuzz.sh 15 || status=1
fuzz_seconds=$((SECONDS - fuzz_started))

wait "$cri_pid"
cri_status=$?
((status == 0)) && status=$cri_status
cri_seconds=$((SECONDS - cri_started))
cat "$cri_log" >>"$log"
# As cargo says it of a test binary that died (the closing line counts it).
((cri_status == 0)) || echo "error: test failed, to rerun pass \`--test cri_pods\`: process didn't exit successfully: $cri_binary (exit status: $cri_status)" >>"$log"
set -e
echo "streams: cri_pods ${cri_seconds}s; the other tests ${other_seconds}s, then fuzz ${fuzz_seconds}s"
# One closing line over every test binary ("ignored" tests are skips; each
# prints why, e.g. the Linux-under-KVM boot on a PVM host).
# A test binary that died (a signal, a timeout) prints no result line:
# it counts as one failure.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     /process didn.t exit successfully/ && !/exit status: 101/ { f += 1 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"

# Where the test step's time went: every test binary over 10 s, longest
# first (libtest's "finished in" of each binary; the L1 suites' cases print
# their own times above).
awk '/^ *Running / { binary = $0; sub(/^ *Running /, "", binary) } /^test result:/ && binary != "" { t = $NF; sub(/s$/, "", t); if (t + 0 >= 10) printf "%6.0fs  %s\n", t, binary; binary = "" }' "$log" \
  | sort -rn | sed '1i test binaries over 10 s:'
step "" ""
# Each failed test's first lines once more, at the end where a truncated
# CI log still shows them (libtest's "---- name stdout ----" sections).
awk 'BEGIN { shown = 99 } /^---- .* ----$/ { shown = 0; print; next } /^(failures:|running |test result:)/ { shown = 99 } shown < 10 && NF { print "  " substr($0, 1, 300); shown++ }' "$log" \
  | sed '1i failures, once more:' | head -200
echo "step times: ${steps[*]}"
exit "$status"
