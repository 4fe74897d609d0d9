#!/usr/bin/env bash
# The whole test suite: the formatting and lint gates, unit tests, integration tests
# against a real etcd and the simulated cluster (with the `failpoints` feature: the lifecycle
# races of tests/failpoints.rs), and a build of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
. scripts/env.sh
cargo fmt --check
# The release profile, like the build below, so grpcio's C++ is compiled once.
cargo clippy --release --all-targets --features failpoints -- -D warnings
cargo build --release --all-targets --features failpoints
cargo test --release --features failpoints -- --test-threads=2
