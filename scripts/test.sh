#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs every test: formatting, lints,
# unit tests and the integration tests (KVM probe guest, guest image under
# QEMU+TCG). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build binaries used by the integration tests"
cargo build --workspace --bins --locked

echo "== guest image (kernel + initramfs; cached outside the repo)"
cargo run --quiet --locked -p microvm-guest-image --bin microvm-image -- all

echo "== tests"
cargo test --workspace --locked -- --test-threads=2
