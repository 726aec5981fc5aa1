#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine of this kind (run as root):
# system packages, the Python virtualenv with pinned dependencies, and a release build of the
# Rust extension into it. Safe to run again; it only does what is missing or stale.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iperf3 tcpdump iproute2 iputils-ping openssl procps)
# tests/systemd: a real systemd as PID 1 of a lab (systemd), unshare/nsenter/setpriv (util-linux), script (bsdutils)
APT_PACKAGES+=(systemd util-linux bsdutils)
APT_PACKAGES+=(strace) # tests/xfrm/capture.py: what `ip xfrm` sends, as reference vectors
APT_PACKAGES+=(tshark) # tests/netns/test_ikev2_tcp.py: IKE and ESP decoded by an independent dissector
APT_PACKAGES+=(gnuplot-nox) # scripts/bench_tunnel.py --plot: the benchmark table as a PNG

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# strongSwan 5.9 (charon + kernel-libipsec userspace ESP, swanctl) for the IKEv2 interop tests
# (tests/strongswan/). Its postinst would start a system-wide daemon: a temporary policy-rc.d
# (exit 101) forbids that unless the machine already has one.
SSW_PACKAGES=(strongswan-charon strongswan-swanctl libcharon-extra-plugins
    libstrongswan-standard-plugins libstrongswan-extra-plugins util-linux)
ssw_missing=()
for p in "${SSW_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || ssw_missing+=("$p")
done
if [ ${#ssw_missing[@]} -gt 0 ]; then
    echo "setup: installing strongSwan packages: ${ssw_missing[*]}"
    ssw_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        ssw_policy=/usr/sbin/policy-rc.d
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${ssw_missing[@]}" >/dev/null
    if [ -n "$ssw_policy" ]; then rm -f "$ssw_policy"; fi
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; this machine needs the Rust toolchain (rustup)" >&2; exit 1; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.deps-stamp
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
    echo "setup: installing Python dependencies (requirements.lock)"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r requirements.lock
    touch "$stamp"
fi

echo "setup: building the Rust extension (release)"
log=$(mktemp)
if ! VIRTUAL_ENV="$PWD/.venv" .venv/bin/maturin develop --release >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: maturin develop failed (output above)" >&2
    exit 1
fi
rm -f "$log"
.venv/bin/python -c "import simpletun._core" || { echo "setup: the extension did not build" >&2; exit 1; }
# qemu + Debian's kernel with ESP, unpacked, for tests/kernel/ (the kernel-ESP interop harness)
bash scripts/setup-kernel.sh
echo "setup: ready (.venv/bin/simpletun)"
