#!/usr/bin/env bash
# The demo source (an app serving its own stream through the full stack) against the harness's
# axum `Sse` + `KeepAlive(1 s)` server: RSS per idle stream of each, N streams, one run.
#
#   bash benches/probes/demo_idle.sh target/release/examples/gateway HARNESS_BIN_DIR [N]
#
# HARNESS_BIN_DIR holds sse-axum and sse-load (../shared/harness, `cargo build --release`).
# The demo sends an event every 60 s and the gateway a heartbeat every 15 s, so the streams are
# as quiet as axum's, which sends a keep-alive comment every second. Loopback only.
set -euo pipefail
GW=$1; B=$2; N=${3:-5000}
ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AX=$(free_port); GP=$(free_port)
"$B/sse-axum" --listen "127.0.0.1:$AX" --keepalive-ms 1000 --exit-after 300 >/dev/null 2>&1 & A=$!
"$GW" --listen "127.0.0.1:$GP" --demo-interval 60000 --heartbeat 15 --idle-timeout 60 --replay 1000 >/dev/null 2>&1 & G=$!
trap 'kill $A $G 2>/dev/null || true' EXIT
sleep 1
for target in "axum:$AX:$A" "demo:$GP:$G"; do
  IFS=: read -r name port pid <<<"$target"
  path=/; [ "$name" = demo ] && path=/events
  "$B/sse-load" --label "$name" --url "http://127.0.0.1:$port$path" --conns "$N" --idle --secs 10 \
    --settle 2 --ramp-concurrency 100 --watch "$name:$pid" 2>/dev/null |
    python3 -c '
import json, sys
run = json.loads(sys.stdin.read())
w = run["watch"][0]
print("{:5} open {}/{} errors {} RSS per stream {:.1f} KB".format(
    run["label"], run["connections_open_at_end"], run["conns"], run["errors"],
    w["rss_per_conn_bytes_end"] / 1000))
'
done
