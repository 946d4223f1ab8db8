#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: a private containerd with the
# CRI plugin, a CNI bridge and our runtime (handler `microvm`) runs a pod
# through CRI, as kubelet would; the pod boots its own microVM (guest kernel
# + agent built and cached by the repo) on the default backend, builtin
# (microvm-vmm, jailed): directly where KVM boots Linux, else in a
# nested-KVM L1 through microvm-kvm-harness, and says which. Its container
# prints the guest's kernel release and the pod's IP, and the demo prints
# how long the pod took to start. The same pod then runs on the qemu backend
# under TCG on this host, and the VMM's own probe guest boots under
# microvm-vmm on this host's KVM and shows its boot time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked --workspace --bins
cargo run --release --locked --quiet -p microvm-guest-image --bin microvm-image -- all >/dev/null
echo "== a Kubernetes pod in a microVM, through containerd's CRI and our shim (default backend)"
target/release/pod-demo --backend builtin
echo
echo "== the same pod on the qemu backend under TCG, on this host"
target/release/pod-demo --backend qemu-tcg
echo
echo "== microvm-vmm on KVM: the probe guest (serial output and boot timer)"
target/release/probe-demo
