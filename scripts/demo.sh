#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: a private containerd with the
# CRI plugin, a CNI bridge and our runtime (handler `microvm`) runs a pod
# through CRI, as kubelet would; the pod boots its own microVM (guest kernel
# + agent built and cached by the repo), its container prints the guest's
# kernel release and the pod's IP, and the demo prints how long the pod took
# to start. Then the VMM's own probe guest boots under microvm-vmm on KVM
# and shows its boot time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked --workspace --bins
cargo run --release --locked --quiet -p microvm-guest-image --bin microvm-image -- all >/dev/null
echo "== a Kubernetes pod in a microVM, through containerd's CRI and our shim"
target/release/pod-demo
echo
echo "== microvm-vmm on KVM: the probe guest (serial output and boot timer)"
target/release/probe-demo
