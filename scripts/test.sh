#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs every test: formatting, lints,
# unit tests and the integration tests (KVM probe guest, guest image under
# QEMU+TCG). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# The probe guest is its own (no_std, excluded) package: cargo picks up its
# .cargo/config.toml only when run from its directory.
probe() {
  local subcommand=$1
  shift
  (cd vmm/probe-guest && cargo "$subcommand" --target-dir ../../target/probe-guest "$@")
}

echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd vmm/probe-guest && cargo fmt -- --check)

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
probe clippy --all-targets --locked -- -D warnings

echo "== build binaries used by the integration tests"
cargo build --workspace --bins --locked

echo "== guest image (kernel + initramfs; cached outside the repo)"
cargo run --quiet --locked -p microvm-guest-image --bin microvm-image -- all

echo "== tests"
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
# seeds and saved crash inputs. Without ASan: the build is what costs here.
echo "== fuzz: every target for 30 s (scripts/fuzz.sh)"
FUZZ_SANITIZER=none scripts/fuzz.sh 30 || status=1
exit "$status"
