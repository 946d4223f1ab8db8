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

step tests "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
probe test --locked 2>&1 | tee -a "$log"
probe_status=${PIPESTATUS[0]}
((status == 0)) && status=$probe_status
set -e
# One closing line over every test binary ("ignored" tests are skips; each
# prints why, e.g. the Linux-under-KVM boot on a PVM host).
# A test binary that died (a signal, a timeout) prints no result line:
# it counts as one failure.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     /process didn.t exit successfully/ && !/exit status: 101/ { f += 1 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"

# Every guest-facing parser's fuzz target for 30 s, after replaying its
# seeds and saved crash inputs, one target per core at a time. Without ASan:
# the build is what costs here.
step fuzz "every target for 30 s (scripts/fuzz.sh)"
FUZZ_SANITIZER=none scripts/fuzz.sh 30 || status=1
step "" ""
echo "step times: ${steps[*]}"
exit "$status"
