#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests against a real etcd and the
# simulated cluster, and a build of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
. scripts/env.sh
cargo build --release --all-targets
cargo test --release -- --test-threads=2
