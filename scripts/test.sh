#!/usr/bin/env bash
# The whole test suite: the formatting and lint gates, unit tests, integration tests
# against a real etcd and the simulated cluster, and a build of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
. scripts/env.sh
cargo fmt --check
# The release profile, like the build below, so grpcio's C++ is compiled once.
cargo clippy --release --all-targets -- -D warnings
cargo build --release --all-targets
cargo test --release -- --test-threads=2
