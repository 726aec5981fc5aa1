#!/usr/bin/env bash
# Installs the other VPNs that `scripts/bench-tunnel.sh --peers` runs beside simpletun (run as
# root; bench-tunnel.sh calls it only with --peers): Debian's openvpn, wireguard-go and
# wireguard-tools (`wg`, to configure the userspace WireGuards through their UAPI sockets), and
# boringtun-cli from crates.io, pinned, into $SIMPLETUN_PEERS_DIR/bin. Idempotent. A peer that
# cannot be installed is reported here and its benchmark row says why; the others still run.
# No service is started: a temporary policy-rc.d forbids the openvpn package's postinst to.
set -uo pipefail
D=${SIMPLETUN_PEERS_DIR:-/var/tmp/simpletun-peers}
BORINGTUN_VERSION=0.7.1 # keep in step with scripts/bench_peers.py
mkdir -p "$D"

APT_PACKAGES=(openvpn wireguard-go wireguard-tools)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-peers: installing Debian packages: ${missing[*]}"
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || echo "setup-peers: apt-get update failed" >&2
    # one at a time, so that one package that cannot be had does not stop the others
    for p in "${missing[@]}"; do
        apt-get install -y -qq --no-install-recommends "$p" >"$D/apt-$p.log" 2>&1 \
            || echo "setup-peers: apt-get install $p failed: $(tail -n 1 "$D/apt-$p.log")" >&2
    done
    [ -n "$policy" ] && rm -f /usr/sbin/policy-rc.d
fi

have=$("$D/bin/boringtun-cli" --version 2>/dev/null || true)
if [ "$have" != "boringtun-cli $BORINGTUN_VERSION" ] && [ "$have" != "boringtun $BORINGTUN_VERSION" ]; then
    if ! command -v cargo >/dev/null; then
        echo "setup-peers: no cargo; boringtun-cli not installed" >&2
    else
        echo "setup-peers: cargo install boringtun-cli $BORINGTUN_VERSION into $D (a few minutes)"
        nice -n 10 cargo install --locked --version "$BORINGTUN_VERSION" --root "$D" boringtun-cli \
            >"$D/cargo-install.log" 2>&1 \
            || echo "setup-peers: cargo install boringtun-cli failed: $(tail -n 1 "$D/cargo-install.log")" >&2
    fi
fi
exit 0
