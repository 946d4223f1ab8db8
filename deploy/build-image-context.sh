#!/bin/sh
# Gathers the DaemonSet image's files into deploy/context (see Dockerfile).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
context="$root/deploy/context"
rm -rf "$context"
mkdir -p "$context/bin" "$context/share"
for binary in containerd-shim-microvm-v2 microvm-vmm microvm-ctl; do
  cp "$root/target/release/$binary" "$context/bin/"
done
kernel=$(ls -d /var/cache/microvm/kernel/*/vmlinux | tail -n 1)
initramfs=$(ls /var/cache/microvm/initramfs/release-*.cpio | tail -n 1)
cp "$kernel" "$context/share/vmlinux"
cp "$initramfs" "$context/share/initramfs.cpio"
cp "$root/deploy/Dockerfile" "$context/"
echo "context ready: docker build -t microvm-deploy $context"
