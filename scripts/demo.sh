#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: a private containerd runs a
# busybox container through containerd-shim-microvm-v2; the pod boots its own
# microVM (guest kernel + agent built and cached by the repo) and the
# container prints the guest's kernel release. Then the VMM's own probe guest
# boots under microvm-vmm on KVM and shows its boot time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked --workspace --bins
cargo run --release --locked --quiet -p microvm-guest-image --bin microvm-image -- all >/dev/null
echo "== a container in a microVM, through containerd and our shim"
target/release/pod-demo
echo
echo "== microvm-vmm on KVM: the probe guest (serial output and boot timer)"
target/release/probe-demo
