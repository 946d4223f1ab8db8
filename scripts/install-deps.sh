#!/usr/bin/env bash
# Installs the Debian packages the build, the tests and the demo need.
# Idempotent: skips apt entirely when everything is already there.
set -euo pipefail

packages=(
  qemu-system-x86      # second hypervisor backend; boots the guest image under TCG
  busybox-static       # rootfs for container tests and the debug initramfs
  protobuf-compiler    # proto/ (tonic/prost)
  cpio                 # initramfs
  flex bison bc libelf-dev libssl-dev  # guest kernel build
  iproute2 e2fsprogs util-linux       # agent tests: ip netns/veth, mkfs.ext4, losetup, unshare
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# containerd, runc and the vhost-user back-ends (vhost-device-vsock,
# virtiofsd) for the shim's qemu backend and its end-to-end tests.
"$(dirname "$0")/../shim/scripts/install-backends.sh"
