#!/usr/bin/env bash
# One run of the harness's load a through a gateway: 50 streams of 256-byte events from
# sse-upstream at full speed (--rate 0), 8 s; prints events/s, p99 and the gateway's CPU per
# event and RSS per stream. Alternate two flag sets by hand to compare them; a single run moves
# by 10 % or more.
#
#   bash benches/probes/load_a.sh GATEWAY HARNESS_BIN_DIR [GATEWAY_ARGS...]
#
# HARNESS_BIN_DIR holds sse-upstream and sse-load (../shared/harness, `cargo build --release`).
# Loopback only.
set -euo pipefail
GW=$1; B=$2; shift 2
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); GP=$(free_port)
"$B/sse-upstream" --listen "127.0.0.1:$UP" --rate 0 --size 256 --exit-after 60 >/dev/null 2>&1 & U=$!
"$GW" --listen "127.0.0.1:$GP" --upstream "http://127.0.0.1:$UP" "$@" >/dev/null 2>&1 & G=$!
trap 'kill $U $G 2>/dev/null || true' EXIT
sleep 1
"$B/sse-load" --label a --url "http://127.0.0.1:$GP/" --conns 50 --secs 8 --watch "gateway:$G" 2>/dev/null |
  python3 -c '
import json, sys
run = json.loads(sys.stdin.read())
w = run["watch"][0]
print("{:>9.0f} ev/s  errors {}  p99 {:8.1f} ms  CPU {:.2f} us/event  RSS {:6.1f} KB/stream".format(
    run["events_per_sec"], run["errors"], run["latency_us"]["p99"] / 1000,
    w["cpu_us_per_event"], w["rss_per_conn_bytes_end"] / 1000))'
