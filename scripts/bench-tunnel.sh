#!/usr/bin/env bash
# Tunnel benchmark (run as root): iperf3 single-flow TCP throughput and ping RTT between two
# network namespaces, for the bare veth, simpletun plaintext, and simpletun ESP with
# aes-128-cbc and aes-256-cbc. Prints a table. Options: see scripts/bench_tunnel.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-tunnel: run as root (network namespaces and TUN devices need it)" >&2
    exit 1
fi
bash scripts/setup.sh
for tool in iperf3 ping ip; do
    command -v "$tool" >/dev/null || { echo "bench-tunnel: '$tool' is missing" >&2; exit 1; }
done
exec .venv/bin/python scripts/bench_tunnel.py "$@"
