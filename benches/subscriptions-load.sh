#!/usr/bin/env bash
# End to end: what reading through a subscription costs next to a plain stream, on one gateway.
#
#   bash benches/subscriptions-load.sh [SECS] [RUNS] [CONNS]
#
# An upstream (the demo source at max rate, 256-byte events) behind one gateway with the full
# stack and --subscriptions --replay 1000. The load client reads, in turn, CONNS streams of:
# - /events: a path that is no topic, untouched by the subscriptions layer (the baseline);
# - /topics/news: each stream a disposable subscription;
# - /subscriptions/{id}/subscribe: CONNS provisioned subscriptions, one channel each (created
#   before the first run; later runs resume each from its cursor).
# It prints one JSON line per load (events/s, latency, gaps and duplicates).
set -euo pipefail
SECS=${1:-10}
RUNS=${2:-3}
CONNS=${3:-50}
cd "$(dirname "$0")/.."
cargo build --release --example gateway --example load
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
bin=target/release/examples
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

wait_port() {
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  exit 1
}

$bin/gateway --listen 127.0.0.1:4300 --heartbeat 0 --no-initial-comment --response-timeout 0 \
  --demo-size 256 --demo-rate 1000000 >/dev/null &
pids+=($!)
$bin/gateway --listen 127.0.0.1:4310 --upstream http://127.0.0.1:4300 --heartbeat 15 \
  --idle-timeout 60 --response-timeout 30 --replay 1000 --subscriptions >/dev/null &
pids+=($!)
wait_port 4300
wait_port 4310

# Each subscription on a topic of its own: the demo source starts a sequence of ids per request,
# so readers of one topic at different points would record overlapping sequences under one key.
provisioned=()
for n in $(seq "$CONNS"); do
  id=$(curl -sf -X POST "http://127.0.0.1:4310/topics/t$n/subscriptions" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
  provisioned+=(--url "http://127.0.0.1:4310/subscriptions/$id/subscribe")
done

load() { # label urls...
  local label=$1
  shift
  $bin/load "$@" --conns "$CONNS" --secs "$SECS" --label "$label"
}
for _ in $(seq "$RUNS"); do
  load plain --url http://127.0.0.1:4310/events
  load disposable --url http://127.0.0.1:4310/topics/news
  load provisioned "${provisioned[@]}"
done
