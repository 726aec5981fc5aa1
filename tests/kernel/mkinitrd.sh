#!/usr/bin/env bash
# Build the harness's initramfs: busybox-static plus the virtio/9p/net modules of the unpacked
# kernel in $KROOT. Its init mounts the HOST root file system read-only over virtio-9p, chroots
# into it and runs the command named by `kesp.run=` on the kernel command line, then powers off.
set -euo pipefail
KROOT=${KROOT:?KROOT must name the unpacked kernel}
KVER=$(ls "$KROOT/lib/modules")
OUT=${1:?output path}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W"/{bin,proc,sys,dev,newroot,mods}
cp /bin/busybox "$W/bin/busybox"
: >"$W/modlist"
for m in virtio_pci 9pnet_virtio 9p virtio_net; do
    modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' | while read -r f; do
    cp "$f" "$W/mods/"
    basename "$f" >>"$W/modlist"
done
cat >"$W/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modlist); do insmod /mods/$m; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot || { echo "kesp: 9p mount failed"; poweroff -f; }
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys; mount -t devtmpfs dev /newroot/dev
mount -t tmpfs tmpfs /newroot/run; mount -t tmpfs tmpfs /newroot/tmp
KROOT=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^kesp.kroot=//p')
RUN=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^kesp.run=//p')
# The kernel's own module auto-loading (authenc, echainiv, ...) must find the unpacked modules.
printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$KROOT" > /newroot/run/modprobe; chmod +x /newroot/run/modprobe
echo /run/modprobe > /proc/sys/kernel/modprobe
# PID 1 itself chroots (usermode helpers share its fs_struct and see the host root too).
exec chroot /newroot /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/sh -c "$RUN; echo kesp: guest command exited rc=\$?; echo o > /proc/sysrq-trigger; sleep 10"
INIT
chmod +x "$W/init"
(cd "$W" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$OUT"
echo "mkinitrd: $OUT ($(stat -c %s "$OUT") bytes)"
