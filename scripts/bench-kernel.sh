#!/usr/bin/env bash
# Side-by-side benchmark (run as root): bare veth, kernel ESP (xfrm, configured by simpletun from
# a manual key file) and simpletun userspace ESP between two namespaces, same cipher, window,
# ESN and transport: iperf3 throughput, ping RTT, CPU time per GB; a table and a PNG plot.
# Options: see scripts/bench_kernel.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-kernel: run as root (network namespaces and xfrm need it)" >&2
    exit 1
fi
if [ "${BENCH_KERNEL_NO_SETUP:-}" != 1 ]; then
    bash scripts/setup.sh
fi
if ! command -v gnuplot >/dev/null && [ "${BENCH_KERNEL_NO_SETUP:-}" != 1 ]; then
    echo "bench-kernel: installing gnuplot-nox for the plot"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null \
        || echo "bench-kernel: gnuplot-nox not installed; no PNG" >&2
fi
for tool in iperf3 ping ip; do
    command -v "$tool" >/dev/null || { echo "bench-kernel: '$tool' is missing" >&2; exit 1; }
done
# On a kernel without ESP (CONFIG_INET_ESP) the kernel row says so and the rest is measured.
# In the qemu guest (tests/kernel) every figure is emulated: correctness only, the output says so.
exec .venv/bin/python scripts/bench_kernel.py "$@"
