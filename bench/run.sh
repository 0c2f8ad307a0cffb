#!/usr/bin/env bash
# timbridge's load harness: floor vs gateway, alternating, on 127.0.0.1 only.
#   bench/run.sh [--quick] [--rounds N] [--modes interval,always,never] [--load loadgen|wrk|both]
# Full: about 9 minutes; --quick: about 3. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --quiet
exec python3 bench/run.py "$@"
