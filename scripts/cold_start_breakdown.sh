#!/bin/bash
# Where a new owner's cold start goes at scale (docs/benchmarks.md, "Against the goals at
# 10^6 regions / 20 stores (session 5)"): one `streamhelper sim` (REGIONS, default 10^6, over
# 20 stores, flushing every 5 s), a task whose start is a minute back, and one advancer; once
# its first upload covers every region, prints the ticker's time and CPU per message kind
# (the owner event holds the snapshot wait, and nested in it the flush messages, their merge
# and the first tick). Usage: scripts/cold_start_breakdown.sh [STREAMHELPER_BIN]
set -eu
BIN=${1:-${CARGO_TARGET_DIR:-target}/release/streamhelper}
D=$(mktemp -d); : > "$D/control"
metrics() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$PORT/metrics', timeout=2).read().decode())" 2>/dev/null || true; }
PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$BIN" sim --stores 20 --regions "${REGIONS:-1000000}" --flush-interval 5000ms --control-file "$D/control" --duration 10m > "$D/sim.out" 2> "$D/sim.log" &
SIM=$!
trap 'kill $SIM ${ADV:-} 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 600); do grep -q '^ready' "$D/sim.out" && break; sleep 0.1; done
PD=$(sed -n 's/^pd: //p' "$D/sim.out"); ETCD=$(sed -n 's/^etcd: //p' "$D/sim.out")
sleep 6 # a flush of every store, so that each has a snapshot to send
START_TS=$(( ($(date +%s%3N) - 60000) << 18 ))
"$BIN" task add t0 --storage "local://$D/storage" --start-ts "$START_TS" -u "$PD" --etcd "$ETCD" > /dev/null
"$BIN" advancer -u "$PD" --etcd "$ETCD" --status-addr "127.0.0.1:$PORT" --tick-interval 2s --try-advance-threshold 6s 2> "$D/advancer.log" &
ADV=$!
SPAWNED=$(date +%s%3N)
for _ in $(seq 1200); do
  CHECKPOINT=$(metrics | sed -n 's/^tidb_log_backup_last_checkpoint{task="t0"} //p')
  [ -n "$CHECKPOINT" ] && python3 -c "import sys; sys.exit(0 if float('$CHECKPOINT') > $START_TS else 1)" && break
  sleep 0.05
done
echo "first upload covering every region: $(( $(date +%s%3N) - SPAWNED )) ms after the advancer was spawned"
metrics | grep -E '^streamhelper_advancer_message_(duration|cpu)_seconds_(sum|count)|^tidb_log_backup_advancer_tick_duration_sec_(sum|count)\{step="tick"\}'
