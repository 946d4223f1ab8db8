#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine. Until the shim lands, that is:
# boot the repo's probe guest under microvm-vmm (KVM), with virtio-blk and a
# hybrid-vsock echo peer, and show its serial output and boot time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p microvm-vmm -p microvm-tests --bins
exec target/release/probe-demo
