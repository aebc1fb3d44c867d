#!/usr/bin/env bash
# The test command: install what the tests need, check formatting and lints, run every test tier
# (unit, core against the fake registry, and real mounts of a real docker-registry).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_deps
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast
else
    cargo test --no-fail-fast
fi
