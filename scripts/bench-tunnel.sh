#!/usr/bin/env bash
# Tunnel benchmark (run as root): single-flow TCP throughput (iperf3), CPU-s per GB of both
# tunnel ends, bytes per TUN read / datagram / TUN write, drops and ping RTT at 1, 20 and 100
# pings/s between two network namespaces: bare veth, simpletun ESP over TCP, UDP and raw ESP
# (with and without offloads; --base DIR adds another checkout's simpletun), in interleaved
# rounds. Prints a table; --plot FILE.png draws it. --peers also installs (scripts/setup-peers.sh)
# and runs OpenVPN, boringtun and wireguard-go in the same rounds. Options: bench_tunnel.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-tunnel: run as root (network namespaces and TUN devices need it)" >&2
    exit 1
fi
bash scripts/setup.sh
for arg in "$@"; do
    if [ "$arg" = --peers ]; then
        bash scripts/setup-peers.sh # never fails: a peer it cannot install gets a "not run" row
    fi
done
for tool in iperf3 ping ip; do
    command -v "$tool" >/dev/null || { echo "bench-tunnel: '$tool' is missing" >&2; exit 1; }
done
exec .venv/bin/python scripts/bench_tunnel.py "$@"
