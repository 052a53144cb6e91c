#!/usr/bin/env bash
# Events/s and latency with many clients on one stream, through the gateway without and with the
# fan-out hub, in one run on this machine.
#
#   bash benches/fanout-load.sh [RATE per stream] [CONNS] [SECS] [RUNS]
#
# An upstream gateway serves the demo stream (256-byte events at RATE per stream); two gateways
# proxy it, one with --fanout --replay; examples/load reads CONNS streams from each.
set -euo pipefail
RATE=${1:-100}; CONNS=${2:-1000}; SECS=${3:-10}; RUNS=${4:-3}
cd "$(dirname "$0")/.."
cargo build --release --example gateway --example load
ulimit -n "$((CONNS * 4 + 1024))" 2>/dev/null || true
bin=target/release/examples
$bin/gateway --listen 127.0.0.1:4100 --demo-rate "$RATE" --demo-size 256 --heartbeat 0 \
  --no-initial-comment >/dev/null &
pids=($!)
$bin/gateway --listen 127.0.0.1:4101 --upstream http://127.0.0.1:4100 >/dev/null &
pids+=($!)
$bin/gateway --listen 127.0.0.1:4102 --upstream http://127.0.0.1:4100 --fanout --replay 1000 >/dev/null &
pids+=($!)
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
sleep 1
for _ in $(seq "$RUNS"); do
  $bin/load --url http://127.0.0.1:4101/events --conns "$CONNS" --secs "$SECS" --label "no hub, $RATE/s"
  $bin/load --url http://127.0.0.1:4102/events --conns "$CONNS" --secs "$SECS" --label "hub, $RATE/s"
done
