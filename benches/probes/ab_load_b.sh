#!/usr/bin/env bash
# Two gateway settings A and B back to back under the harness's load b (1,000 streams x 10
# events/s of 256 bytes from sse-upstream), PAIRS times in alternation: CPU per event, p99 and
# RSS per stream of each run, then the mean of each side. Run to run the machine moves by 10 %
# or more; alternating pairs is how a change of a few percent shows through that.
#
#   bash benches/probes/ab_load_b.sh GATEWAY_A GATEWAY_B HARNESS_BIN_DIR [PAIRS] -- ARGS_A -- ARGS_B
#
# e.g. the write strategy, one binary, two flag sets:
#   bash benches/probes/ab_load_b.sh target/release/examples/gateway target/release/examples/gateway \
#     /tmp/sse-harness-target/release 4 -- --heartbeat 15 --idle-timeout 60 --replay 1000 \
#     -- --heartbeat 15 --idle-timeout 60 --replay 1000 --http1-writev
#
# HARNESS_BIN_DIR holds sse-upstream and sse-load (../shared/harness, `cargo build --release`).
# Loopback only.
set -euo pipefail
GA=$1; GB=$2; B=$3; PAIRS=4
shift 3
if [ "${1:-}" != -- ]; then PAIRS=$1; shift; fi
[ "${1:-}" = -- ] || { echo "usage: see the head of $0" >&2; exit 2; }
shift
ARGS_A=(); while [ $# -gt 0 ] && [ "$1" != -- ]; do ARGS_A+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
ARGS_B=("$@")
ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() { # LABEL GATEWAY ARGS...
  local label=$1 gw=$2; shift 2
  local up gp u g
  up=$(free_port); gp=$(free_port)
  "$B/sse-upstream" --listen "127.0.0.1:$up" --rate 10 --size 256 --exit-after 120 >/dev/null 2>&1 & u=$!
  sleep 0.5
  "$gw" --listen "127.0.0.1:$gp" --upstream "http://127.0.0.1:$up" "$@" >/dev/null 2>&1 & g=$!
  sleep 0.7
  "$B/sse-load" --label "$label" --url "http://127.0.0.1:$gp/" --conns 1000 --secs 10 \
    --watch "gateway:$g" 2>/dev/null
  kill "$u" "$g" 2>/dev/null || true
  wait "$u" "$g" 2>/dev/null || true
}
for _ in $(seq "$PAIRS"); do
  run A "$GA" "${ARGS_A[@]}"
  run B "$GB" "${ARGS_B[@]}"
done | python3 -c '
import json, sys
runs = {"A": [], "B": []}
for line in sys.stdin:
    run = json.loads(line)
    w = run["watch"][0]
    cpu = w["cpu_us_per_event"]
    runs[run["label"]].append(cpu)
    print("{} {:8.0f} ev/s  errors {}  p99 {:6.2f} ms  CPU {:5.2f} us/event  RSS {:5.1f} KB/stream".format(
        run["label"], run["events_per_sec"], run["errors"], run["latency_us"]["p99"] / 1000,
        cpu, w["rss_per_conn_bytes_end"] / 1000))
a, b = (sum(v) / len(v) for v in (runs["A"], runs["B"]))
print("mean CPU per event: A {:.2f} us, B {:.2f} us, B/A {:.3f}".format(a, b, b / a))
'
