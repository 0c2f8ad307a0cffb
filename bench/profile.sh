#!/usr/bin/env bash
# The gateway under callgrind (default) or perf for a fixed request count.
#   bench/profile.sh [--tool callgrind|perf] [--requests N]
# See bench/README.md, "Profile".
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --quiet
# Line tables keep inlined frames named; a target dir of its own keeps the
# measured binaries in target/release untouched.
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_TARGET_DIR=target/prof \
    cargo build --release --bin timbridge --quiet
exec python3 bench/profile_run.py "$@"
