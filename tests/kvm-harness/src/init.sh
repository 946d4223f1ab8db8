#!/bin/busybox sh
# microvm-kvm-harness, stage 1: /init of L1's initramfs (busybox).
# Loads the modules, mounts the host's files (virtio-fs, read-only) under a
# writable overlay per top-level directory (the host's mount points answer
# EREMOTE through virtio-fs, so one overlay of / would not do), adds fresh
# kernel filesystems, cgroup v2 and tmpfs /run and /tmp, then switches to
# that root and execs the harness binary as PID 1 (stage 2), which runs the
# command. A failure here is one line on the console, which the host side
# quotes, and a power-off.
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

fail() {
	echo "microvm-kvm-harness: error: $*" >/dev/console
	poweroff -f
	sleep 60
}

say() { echo "microvm-kvm-harness: $*" >/dev/console; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say "stage 1: loading modules"

while read -r module; do
	insmod "/lib/modules/$module.ko" && continue
	case "$module" in
	kvm_amd) fail "no /dev/kvm in L1: kvm_amd did not load, so L1's CPU has no AMD SVM (QEMU must run L1 with -cpu max under TCG)" ;;
	*) fail "cannot load kernel module $module into L1" ;;
	esac
done </harness/modules

[ -c /dev/kvm ] ||
	fail "no /dev/kvm in L1 after loading kvm_amd"

say "stage 1: mounting the host's files"
mkdir -p /host /rw /newroot
mount -t virtiofs -o ro hostroot /host ||
	fail "cannot mount the host's files (virtio-fs tag hostroot)"
mount -t tmpfs -o mode=0755 rw /rw
mount -t tmpfs -o mode=0755 root /newroot

for entry in /host/* /host/.[!.]*; do
	name=${entry#/host/}
	case "$name" in
	'*' | '.[!.]*' | proc | sys | dev | run | tmp | lost+found) continue ;;
	esac
	if [ -L "$entry" ]; then
		ln -s "$(readlink "$entry")" "/newroot/$name"
	elif [ -d "$entry" ]; then
		mkdir -p "/rw/$name/upper" "/rw/$name/work" "/newroot/$name"
		mount -t overlay overlay \
			-o "lowerdir=$entry,upperdir=/rw/$name/upper,workdir=/rw/$name/work" \
			"/newroot/$name" || fail "cannot overlay the host's /$name"
	fi
done

say "stage 1: kernel filesystems"
cd /newroot || fail "no new root"
mkdir -p proc sys dev run tmp
mount -t proc proc proc
mount -t sysfs sysfs sys
mount -t devtmpfs devtmpfs dev
mkdir -p dev/pts dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts dev/pts
ln -sf pts/ptmx dev/ptmx
# What udev makes on a host; bash's process substitution needs /dev/fd.
ln -s /proc/self/fd dev/fd
ln -s /proc/self/fd/0 dev/stdin
ln -s /proc/self/fd/1 dev/stdout
ln -s /proc/self/fd/2 dev/stderr
mount -t tmpfs -o mode=1777 shm dev/shm
mount -t cgroup2 cgroup2 sys/fs/cgroup || fail "cannot mount cgroup v2"
mount -t tmpfs -o mode=0755 run run
mount -t tmpfs -o mode=1777 tmp tmp
# containerd and the shim expect these on a host.
mkdir -p run/netns run/lock

hostname microvm-kvm-l1
ifconfig lo 127.0.0.1 up

mkdir -p run/microvm-kvm-harness
cp /harness/command.json run/microvm-kvm-harness/command.json ||
	fail "no command in the initramfs"
exe=$(cat /harness/exe)
say "stage 1: starting stage 2 ($exe)"
cd /
exec switch_root /newroot "$exe" l1-init /run/microvm-kvm-harness/command.json
