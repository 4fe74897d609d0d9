#!/usr/bin/env bash
# The main job on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
. scripts/env.sh
cargo run --release -- demo "$@"
