#!/usr/bin/env bash
# 20,000 idle streams proxied by the gateway (full stack): every stream connected, heartbeats
# flowing, no error, and the gateway's RSS per stream.
#
#   bash benches/probes/idle_20k.sh target/release/examples/gateway [N]
#
# Each proxied stream holds two sockets in the proxy, so one process needs 2N open files. The
# script raises the open-files limit when it can (raising the hard limit needs root). Then it
# runs ../shared/harness's versus.sh, load c only: N idle streams through nginx and through the
# gateway to sse-axum (KeepAlive 1 s), held 20 s so the gateway's 15 s heartbeat fires.
#
# Where the hard limit cannot be raised (a container without CAP_SYS_RESOURCE), one process
# cannot hold N streams, so the N streams are split over as many gateway processes as the limit
# requires (as nginx splits its connections over worker processes), all running at once on this
# machine: shard i is its own sse-axum, gateway and sse-load, with N/shards streams. Each shard
# prints its line; the last line sums them.
#
# The ephemeral port range is widened for the run and put back on exit. Loopback only.
set -euo pipefail
GW=$1; N=${2:-20000}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
HARNESS=${HARNESS:-$HERE/../shared/harness}
SECS=${IDLE_SECS:-20}
# A proxy holds two sockets per stream; the load tool and the upstream one each.
need=$((N * 2 + 500))
shards=1
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need" ]; then
  if ! ulimit -Hn "$need" 2>/dev/null; then
    fits=$((($(ulimit -Hn) - 500) / 2))
    shards=$(((N + fits - 1) / fits))
    # Room to spare: a shard that holds exactly its limit has no file left for anything else.
    [ $((N / shards)) -gt $((fits * 9 / 10)) ] && shards=$((shards + 1))
    echo "the open-files hard limit is $(ulimit -Hn) and cannot be raised here (raising it needs" \
      "CAP_SYS_RESOURCE): one proxy process holds at most $fits streams, so $N streams run as" \
      "$shards gateway processes at once" >&2
  fi
fi
ulimit -n "$(ulimit -Hn)"
ports=/proc/sys/net/ipv4/ip_local_port_range
cleanup() { :; }
reserved=/proc/sys/net/ipv4/ip_local_reserved_ports
if [ -w "$ports" ] && [ -w "$reserved" ]; then
  saved=$(cat "$ports"); saved_reserved=$(cat "$reserved")
  # Put back on exit. The harness's fixed listening ports (18700-18799) stay out of the range
  # during the run too: a connection of this run left in TIME-WAIT on one of them would keep
  # the next versus.sh from listening there for a minute.
  cleanup() { echo "$saved" >"$ports"; echo "$saved_reserved" >"$reserved"; }
  echo "${saved_reserved:+$saved_reserved,}18700-18799" >"$reserved"
  echo "1024 65000" >"$ports"
fi
trap 'cleanup' EXIT
echo "open files: $(ulimit -n) per process; ports: $(cat "$ports")" >&2

report='
import json, sys
total = {"conns": 0, "open": 0, "errors": 0, "rss": 0, "comments": 0.0}
for line in sys.stdin:
    run = json.loads(line)
    proxies = [w for w in run.get("watch", []) if w["name"] != "upstream"]
    for w in proxies or run.get("watch", []):
        print("{:16} open {}/{} errors {} comments/stream/s {:.2f} {:9} RSS per stream {:.1f} KB".format(
            run["label"], run["connections_open_at_end"], run["conns"], run["errors"],
            run["comments_per_conn_per_sec"], w["name"], w["rss_per_conn_bytes_end"] / 1000))
        if run["label"].startswith("shard"):
            total["conns"] += run["conns"]
            total["open"] += run["connections_open_at_end"]
            total["errors"] += run["errors"]
            total["rss"] += w["rss_per_conn_bytes_end"] * run["connections_open_at_end"]
            total["comments"] += run["comments_per_conn_per_sec"] * run["connections_open_at_end"]
if total["conns"]:
    print("{:16} open {}/{} errors {} comments/stream/s {:.2f} {:9} RSS per stream {:.1f} KB".format(
        "all shards", total["open"], total["conns"], total["errors"],
        total["comments"] / max(total["open"], 1), "gateways", total["rss"] / max(total["open"], 1) / 1000))
'

if [ "$shards" = 1 ]; then
  IDLE_CONNS=$N IDLE_SECS=$SECS ONLY=c \
    bash "$HARNESS/scripts/versus.sh" "$GW" --heartbeat 15 --idle-timeout 60 --replay 1000 |
    python3 -c "$report"
  exit 0
fi

T=${HARNESS_TARGET:-$HARNESS/target}; [ -w "$HARNESS" ] || T=${HARNESS_TARGET:-/tmp/sse-harness-target}
cargo build --release --quiet --manifest-path "$HARNESS/Cargo.toml" --target-dir "$T" >&2
B=$T/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.05; done; echo "nothing on $1" >&2; return 1; }
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; cleanup; }
trap 'stop_all' EXIT
OUT=$(mktemp)
loads=()
for shard in $(seq "$shards"); do
  conns=$((N / shards)); [ "$shard" = "$shards" ] && conns=$((N - (shards - 1) * (N / shards)))
  ax=$(free_port); gp=$(free_port)
  "$B/sse-axum" --listen "127.0.0.1:$ax" --keepalive-ms 1000 --exit-after 300 >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port "$ax"
  "$GW" --listen "127.0.0.1:$gp" --upstream "http://127.0.0.1:$ax" \
    --heartbeat 15 --idle-timeout 60 --replay 1000 >/dev/null 2>&1 &
  gw=$!; PIDS+=("$gw")
  wait_port "$gp"
  loads+=("$gp:$gw:$conns:$shard")
done
for load in "${loads[@]}"; do
  IFS=: read -r gp gw conns shard <<<"$load"
  "$B/sse-load" --label "shard$shard" --url "http://127.0.0.1:$gp/" --conns "$conns" --idle \
    --secs "$SECS" --settle 2 --ramp-concurrency 100 --ramp-timeout 120 \
    --watch "gateway:$gw" >>"$OUT" 2>/dev/null &
  PIDS+=($!)
done
# The loads print one line each when their window ends.
for _ in $(seq $((SECS + 200))); do
  [ "$(wc -l <"$OUT")" -ge "$shards" ] && break
  sleep 1
done
python3 -c "$report" <"$OUT"
rm -f "$OUT"
