#!/usr/bin/env bash
# Soak under attack (run as root, not part of CI): see scripts/soak.py. Default 10 minutes;
# e.g. `bash scripts/soak.sh --seconds 60` for a short run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "soak: run as root (network namespaces and TUN devices need it)" >&2
    exit 1
fi
bash scripts/setup.sh
exec .venv/bin/python scripts/soak.py "$@"
