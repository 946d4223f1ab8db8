#!/usr/bin/env bash
# Installs what the shim's `qemu` backend and its end-to-end tests need:
# containerd (Debian 1.6, with ctr and runc for comparison), QEMU, and the
# two vhost-user back-ends from crates.io. Idempotent.
set -euo pipefail

packages=(
  containerd runc          # containerd 1.6 + ctr; runc for the benchmark's baseline
  containernetworking-plugins  # CNI bridge/host-local/loopback for CRI pods (/usr/lib/cni)
  qemu-system-x86          # the qemu backend
  busybox-static           # the test image's rootfs
  libseccomp-dev libcap-ng-dev  # virtiofsd's build
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "install-backends: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d-less Debian starts containerd.service on install when
  # systemd runs; the tests use a private containerd, so either is fine.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Pinned: the versions the qemu backend was tested with.
crates=(vhost-device-vsock@0.3.0 virtiofsd@1.14.0)
for crate in "${crates[@]}"; do
  name=${crate%@*}
  version=${crate#*@}
  if ! cargo install --list | grep -qx "$name v$version:"; then
    echo "install-backends: cargo install $crate"
    cargo install --locked --quiet "$crate"
  fi
done
