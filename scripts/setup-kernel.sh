#!/usr/bin/env bash
# Set-up of the kernel-ESP test harness (tests/kernel/): qemu (software emulation), busybox and
# kmod from apt, Debian's current stock kernel (which has ESP as modules) downloaded with
# `apt-get download` and unpacked (not installed; nothing touches /boot) into $SIMPLETUN_KESP_DIR,
# and a tiny initramfs that mounts the host's root read-only over virtio-9p. Idempotent: does only
# what is missing. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${SIMPLETUN_KESP_DIR:-/var/tmp/simpletun-kesp}
KROOT=$D/kroot
mkdir -p "$D"

APT_PACKAGES=(qemu-system-x86 busybox-static kmod)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-kernel: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! ls "$KROOT"/boot/vmlinuz-* >/dev/null 2>&1 || [ ! -f "$KROOT/.complete" ]; then
    PKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$PKG" ] || { echo "setup-kernel: cannot find the Debian kernel package (apt-cache depends linux-image-amd64)" >&2; exit 1; }
    echo "setup-kernel: downloading $PKG"
    rm -f "$D"/linux-image-*.deb
    (cd "$D" && apt-get download -qq "$PKG")
    rm -rf "$KROOT"
    dpkg -x "$D/${PKG}"_*.deb "$KROOT"
    KVER=$(ls "$KROOT/lib/modules")
    depmod -b "$KROOT" "$KVER" # the .deb ships no modules.dep
    rm -f "$D"/linux-image-*.deb "$D/initrd.cpio.gz"
    touch "$KROOT/.complete"
fi
if [ ! -f "$D/initrd.cpio.gz" ] || [ tests/kernel/mkinitrd.sh -nt "$D/initrd.cpio.gz" ]; then
    KROOT=$KROOT bash tests/kernel/mkinitrd.sh "$D/initrd.cpio.gz.$$"
    mv -f "$D/initrd.cpio.gz.$$" "$D/initrd.cpio.gz" # atomic: a running guest keeps its copy
fi
echo "setup-kernel: ready ($(ls "$KROOT"/boot/vmlinuz-*))"
