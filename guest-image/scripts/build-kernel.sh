#!/usr/bin/env bash
# Builds the pod VM guest kernel from Debian's linux-source-6.1 and the
# fragments in kernel-config/, and caches it outside the repo.
#
# Usage: build-kernel.sh   (normally run by `microvm-image kernel`)
#   Output:  ${MICROVM_CACHE_DIR:-/var/cache/microvm}/kernel/<source-version>-<hash>/
#            {vmlinux,bzImage,config}
#   <hash> covers every kernel-config/*.config fragment (name and content)
#   and this script, so the kernel is rebuilt only when one of them changes.
#   The last stdout line is `MICROVM_KERNEL_DIR=<dir>`; all logs go to stderr.
#
# Environment:
#   MICROVM_CACHE_DIR            cache root (default /var/cache/microvm)
#   MICROVM_KERNEL_CONFIG_DIR    fragment dir (default: kernel-config/ of this repo)
#   MICROVM_LINUX_SOURCE_VERSION Debian version of linux-source-6.1 to pin
#   MICROVM_KERNEL_JOBS          make -j value (default: nproc)
set -euo pipefail

# Pinned with `apt-cache policy linux-source-6.1` (bookworm-security). Bump it
# together with a rebuild check; the cache key includes it.
LINUX_SOURCE_VERSION="${MICROVM_LINUX_SOURCE_VERSION:-6.1.192-2}"
LINUX_SOURCE_PACKAGE="linux-source-6.1"
# Host tools the kernel build needs; installed idempotently below.
BUILD_DEPS=(build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils)

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(cd "$script_dir/../.." && pwd)"
config_dir="${MICROVM_KERNEL_CONFIG_DIR:-$repo_dir/kernel-config}"
cache_root="${MICROVM_CACHE_DIR:-/var/cache/microvm}"
jobs="${MICROVM_KERNEL_JOBS:-$(nproc)}"

log() { echo "build-kernel: $*" >&2; }
die() { echo "build-kernel: error: $*" >&2; exit 1; }

shopt -s nullglob
fragments=("$config_dir"/*.config)
shopt -u nullglob
[ ${#fragments[@]} -gt 0 ] || die "no *.config fragments in $config_dir"
# Fixed order (C collation), so the merge and the hash do not depend on locale.
mapfile -t fragments < <(printf '%s\n' "${fragments[@]}" | LC_ALL=C sort)

# Cache key: fragment names + contents + this script.
key_hash="$(
    {
        for f in "${fragments[@]}"; do
            printf '%s\n' "$(basename "$f")"
            sha256sum < "$f"
        done
        sha256sum < "${BASH_SOURCE[0]}"
    } | sha256sum | cut -c1-16
)"
out_dir="$cache_root/kernel/$LINUX_SOURCE_VERSION-$key_hash"

exit_if_cached() {
    if [ -s "$out_dir/vmlinux" ] && [ -s "$out_dir/bzImage" ] && [ -s "$out_dir/config" ]; then
        log "cached: $out_dir"
        echo "MICROVM_KERNEL_DIR=$out_dir"
        exit 0
    fi
}
exit_if_cached

# One build at a time per cache (parallel tests, several checkouts); whoever
# waited finds the kernel the other one built.
mkdir -p "$cache_root/kernel"
exec 9>"$cache_root/kernel/.lock"
flock 9
exit_if_cached

# --- dependencies (apt, idempotent) -----------------------------------------
installed_version="$(dpkg-query -W -f='${Version}' "$LINUX_SOURCE_PACKAGE" 2>/dev/null || true)"
missing=()
for dep in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$dep" 2>/dev/null | grep -q "install ok installed" || missing+=("$dep")
done
if [ "$installed_version" != "$LINUX_SOURCE_VERSION" ]; then
    missing+=("$LINUX_SOURCE_PACKAGE=$LINUX_SOURCE_VERSION")
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing with apt: ${missing[*]}"
    command -v apt-get >/dev/null || die "apt-get not found; cannot install ${missing[*]}"
    # Wait for a dpkg lock held by someone else's apt instead of failing.
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends --allow-downgrades \
            -o DPkg::Lock::Timeout=600 "$@" >&2
    }
    if ! apt_install "${missing[@]}"; then
        log "apt-get install failed; running apt-get update and retrying once"
        apt-get update >&2 || die "apt-get update failed"
        apt_install "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed (is $LINUX_SOURCE_PACKAGE=$LINUX_SOURCE_VERSION still in the archive? see apt-cache policy $LINUX_SOURCE_PACKAGE)"
    fi
fi
tarball="/usr/src/linux-source-6.1.tar.xz"
[ -f "$tarball" ] || die "$tarball missing after installing $LINUX_SOURCE_PACKAGE"

# --- unpack (once per source version) ----------------------------------------
src_parent="$cache_root/kernel/src/$LINUX_SOURCE_VERSION"
src_dir="$src_parent/linux-source-6.1"
if [ ! -f "$src_parent/.unpacked" ]; then
    log "unpacking $tarball into $src_parent"
    rm -rf "$src_parent"
    mkdir -p "$src_parent"
    tar -xJf "$tarball" -C "$src_parent"
    touch "$src_parent/.unpacked"
fi

# --- configure: tinyconfig + fragments ----------------------------------------
# Out-of-tree build (O=) in a scratch dir under the cache, never in the repo.
build_dir="$cache_root/kernel/build-$LINUX_SOURCE_VERSION-$key_hash"
rm -rf "$build_dir"
mkdir -p "$build_dir"

# Fixed build identity so two builds of the same inputs match.
export KBUILD_BUILD_TIMESTAMP="1970-01-01 00:00:00 UTC"
export KBUILD_BUILD_USER="microvm"
export KBUILD_BUILD_HOST="microvm"
export KBUILD_BUILD_VERSION="1"
export LC_ALL=C

make_k() { make -C "$src_dir" O="$build_dir" ARCH=x86_64 "$@"; }

log "configuring: allnoconfig + tiny.config + ${#fragments[@]} fragments"
# This is `make tinyconfig` (allnoconfig with the kernel's tiny fragments)
# with our fragments merged last, resolved in one allnoconfig pass so every
# symbol nobody asked for is off. (Merging onto a finished tinyconfig with
# olddefconfig would instead turn on the defaults of newly visible symbols.)
# merge_config.sh -m only merges the lists (warning on overrides); it writes
# temp files into the cwd, hence the cd.
merged="$build_dir/merged.config"
(cd "$build_dir" && KCONFIG_CONFIG="$merged" "$src_dir/scripts/kconfig/merge_config.sh" -m \
    "$src_dir/kernel/configs/tiny-base.config" \
    "$src_dir/kernel/configs/tiny.config" \
    "$src_dir/arch/x86/configs/tiny.config" \
    "${fragments[@]}" >&2)
make_k KCONFIG_ALLCONFIG="$merged" allnoconfig >&2

# --- check every requested option survived ------------------------------------
# `CONFIG_X=v` must appear verbatim; `# CONFIG_X is not set` must not be
# enabled. A dropped option usually means a missing dependency.
failed=0
for f in "${fragments[@]}"; do
    while IFS= read -r line; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            opt="${BASH_REMATCH[1]}"
            if ! grep -qxF -- "$line" "$build_dir/.config"; then
                actual="$(grep -E "^(# )?$opt[= ]" "$build_dir/.config" || echo "absent")"
                log "option dropped by kconfig: $line requested in $(basename "$f"), final: $actual"
                failed=1
            fi
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            opt="${BASH_REMATCH[1]}"
            if grep -qE "^$opt=" "$build_dir/.config"; then
                log "option forced on by kconfig: $opt=n requested in $(basename "$f"), final: $(grep -E "^$opt=" "$build_dir/.config")"
                failed=1
            fi
        fi
    done < "$f"
done
[ "$failed" -eq 0 ] || die "requested kernel options did not survive the merge (see above)"

# --- build --------------------------------------------------------------------
log "building vmlinux and bzImage with -j$jobs in $build_dir"
start=$(date +%s)
make_k -j"$jobs" vmlinux bzImage >&2
log "build took $(( $(date +%s) - start )) s"

# Publish atomically: copy into a temp dir, then rename.
tmp_out="$out_dir.tmp.$$"
rm -rf "$tmp_out"
mkdir -p "$tmp_out"
cp "$build_dir/vmlinux" "$tmp_out/vmlinux"
cp "$build_dir/arch/x86/boot/bzImage" "$tmp_out/bzImage"
cp "$build_dir/.config" "$tmp_out/config"
rm -rf "$out_dir"
mv "$tmp_out" "$out_dir"
rm -rf "$build_dir"
log "done: $out_dir"
echo "MICROVM_KERNEL_DIR=$out_dir"
