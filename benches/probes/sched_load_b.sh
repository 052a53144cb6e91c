#!/usr/bin/env bash
# Who waits for a CPU under the harness's load b (1,000 streams x 10 events/s of 256 bytes from
# sse-upstream): one run through a proxy, then the proxy's CPU per event and p99, and for the
# proxy, the upstream and the load tool over 4 s of the run: time on a CPU, time runnable but
# waiting for one (the run queue, from /proc/PID/task/*/schedstat) and timeslices. On a machine
# where the three share the cores, a proxy that keeps more threads busy delays the load tool,
# whose reads are the end of every event's latency. Also how often each went to sleep (voluntary
# context switches) and was taken off a CPU while it could run (involuntary ones): a process
# preempted in the middle of its work keeps every event it has not sent yet waiting.
#
#   bash benches/probes/sched_load_b.sh GATEWAY HARNESS_BIN_DIR [GATEWAY_ARGS...]
#   bash benches/probes/sched_load_b.sh nginx HARNESS_BIN_DIR
#
# HARNESS_BIN_DIR holds sse-upstream and sse-load (../shared/harness, `cargo build --release`);
# nginx runs through ../shared/harness/scripts/nginx.sh (NGINX_WORKERS workers, one by default;
# with more, the CPU figure is the first worker's). Loopback only.
set -euo pipefail
PROXY=$1; B=$2; shift 2
HERE=$(cd "$(dirname "$0")/../.." && pwd)
NG=${HARNESS:-$HERE/../shared/harness}/scripts/nginx.sh
ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); PP=$(free_port)
"$B/sse-upstream" --listen "127.0.0.1:$UP" --rate 10 --size 256 --exit-after 60 >/dev/null 2>&1 & U=$!
sleep 0.5
if [ "$PROXY" = nginx ]; then
  NGINX_WORKERS=${NGINX_WORKERS:-1} "$NG" start sched "$PP" "$UP" >/dev/null
  P=$("$NG" workers sched | head -1)
  trap '"$NG" stop sched >/dev/null; kill $U 2>/dev/null || true' EXIT
else
  "$PROXY" --listen "127.0.0.1:$PP" --upstream "http://127.0.0.1:$UP" "$@" >/dev/null 2>&1 & P=$!
  trap 'kill $P $U 2>/dev/null || true' EXIT
fi
sleep 0.7
snap() {
  local sched switches
  sched=$(cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{r+=$1; w+=$2; n+=$3} END {printf "%.0f %.0f %.0f", r, w, n}')
  switches=$(cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt/ {v+=$2} /^nonvoluntary_ctxt/ {n+=$2} END {printf "%d %d", v, n}')
  echo "$sched $switches"
}
OUT=$(mktemp)
"$B/sse-load" --label b --url "http://127.0.0.1:$PP/" --conns 1000 --secs 10 --watch "proxy:$P" 2>/dev/null >"$OUT" & L=$!
sleep 6
declare -A before
for who in proxy:$P upstream:$U load:$L; do before[$who]=$(snap "${who#*:}"); done
sleep 4
for who in proxy:$P upstream:$U load:$L; do
  read -r r1 w1 n1 v1 i1 <<<"${before[$who]}"; read -r r2 w2 n2 v2 i2 < <(snap "${who#*:}")
  printf '%-9s on a CPU %5d ms  waiting for one %5d ms  timeslices %6d  slept %6d  preempted %6d\n' \
    "${who%%:*}" $(((r2 - r1) / 1000000)) $(((w2 - w1) / 1000000)) $((n2 - n1)) $((v2 - v1)) $((i2 - i1))
done
wait "$L"
python3 - "$OUT" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
w = run["watch"][0]
print("{:.0f} ev/s  errors {}  p99 {:.2f} ms  CPU {:.2f} us/event".format(
    run["events_per_sec"], run["errors"], run["latency_us"]["p99"] / 1000, w["cpu_us_per_event"]))
PY
