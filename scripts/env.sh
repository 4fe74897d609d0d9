# Sourced by the scripts: one optimized build shared by tests, benches and the binary,
# kept outside the clone so fresh clones (and CI) reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/streamhelper-target}"
