#!/usr/bin/env bash
# ESP encap/decap throughput of simpletun-core next to `openssl speed` (AES-CBC, HMAC-SHA-256)
# at 64, 512, 1420, 8192 and 65000 bytes; a second table puts serial and batched encap (8 packets
# per call, CBC chains and HMACs interleaved) and decap beside OpenSSL's stitched
# aes-128-cbc-hmac-sha256. HMAC alone, 1-4 ways: cargo run --release --example hmac_bench.
# Arguments go to the benchmark, e.g.
#   bash scripts/bench-esp.sh --reps 3            # best of 3 rounds (about 5 minutes)
#   bash scripts/bench-esp.sh --sizes 1420 --keys 128
# Options: --seconds N (per figure, default 1), --reps N, --sizes a,b,.., --keys 128,256, --batch N,
# --wall (wall-clock instead of CPU time), --no-openssl. See rust/core/examples/esp_bench.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v openssl >/dev/null || echo "bench-esp: openssl not found; only our figures will be shown" >&2
exec cargo run --release -q -p simpletun-core --example esp_bench -- "$@"
