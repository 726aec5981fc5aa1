#!/usr/bin/env bash
# The whole test run: set-up, lints, Rust tests, fuzz smoke, Python tests (netns suite included
# when root). Exit status is non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== lint"
cargo fmt --all --check
cargo clippy --workspace --all-targets -q -- -D warnings
.venv/bin/ruff check simpletun tests scripts examples
.venv/bin/ruff format --check simpletun tests scripts examples

echo "== cargo test"
cargo test --workspace --exclude simpletun-py

if [ -x scripts/fuzz-smoke.sh ]; then
    echo "== fuzz smoke"
    bash scripts/fuzz-smoke.sh
fi

echo "== pytest"
.venv/bin/python -m pytest tests "$@"
