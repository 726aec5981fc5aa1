#!/bin/sh
# Runs INSIDE the qemu guest (Debian's kernel, with ESP) as the harness's kesp.run= command:
# loads the modules, brings up the NIC, and runs tests/kernel/guest_main.py for the group named
# by kesp.group= with the project's own .venv (the host root is mounted read-only).
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
KROOT=$(arg kesp.kroot)
GROUP=$(arg kesp.group)
KEYS=$(arg kesp.keys)
MP=modprobe
[ -d "/lib/modules/$(uname -r)" ] || MP="modprobe -d $KROOT"
for m in virtio_net esp4 xfrm_user xfrm_interface aesni_intel sha256_ssse3 tun veth; do
    $MP $m || echo "kesp: modprobe $m failed"
done
IF=$(ip -o link | awk -F': ' '/52:54:00:99:00:02/{print $2}')
ip link set lo up
ip link set "$IF" up
ip addr add 10.99.0.2/24 dev "$IF"
echo "kesp: guest ready at $(cut -d' ' -f1 /proc/uptime)s, NIC $IF"
cd "$REPO" && "$REPO/.venv/bin/python" -m tests.kernel.guest_main "$GROUP" "$IF" "$KEYS"
echo "kesp: guest_main rc=$? at $(cut -d' ' -f1 /proc/uptime)s"
