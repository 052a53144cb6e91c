#!/usr/bin/env bash
# 20,000 idle streams proxied by the gateway (full stack) and by nginx, side by side: every
# stream connected, heartbeats flowing, no error, and the proxy's RSS per stream.
#
#   bash benches/probes/idle_20k.sh target/release/examples/gateway [N]
#
# Runs ../shared/harness's versus.sh, load c only (N idle streams through each proxy to sse-axum
# with KeepAlive 1 s, held 20 s so the gateway's 15 s heartbeat fires), after raising what the
# machine must allow: the open-files limit (each proxied stream holds two sockets in the proxy,
# and the harness runs as many more; raising the hard limit needs root) and the ephemeral port
# range (the load tool's and the proxies' upstream connections). Loopback only.
set -euo pipefail
GW=$1; N=${2:-20000}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
HARNESS=${HARNESS:-$HERE/../shared/harness}
# A proxy holds two sockets per stream; the load tool one.
need=$((N * 2 + 500))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need" ]; then
  if ! ulimit -Hn "$need" 2>/dev/null; then
    fits=$((($(ulimit -Hn) - 500) / 2))
    echo "the open-files hard limit is $(ulimit -Hn) and cannot be raised here (raising it needs" \
      "CAP_SYS_RESOURCE): one proxy process holds at most $fits streams; holding $fits, not $N" >&2
    N=$fits
  fi
fi
ulimit -n "$(ulimit -Hn)"
# Ports from 1024 up, put back on exit: left wider, they would collide with fixed listening ports
# of later runs (the harness's among them).
ports=/proc/sys/net/ipv4/ip_local_port_range
if [ -w "$ports" ]; then
  saved=$(cat "$ports")
  trap 'echo "$saved" > "$ports"' EXIT
  echo "1024 65000" > "$ports"
fi
echo "open files: $(ulimit -n); ports: $(cat /proc/sys/net/ipv4/ip_local_port_range)" >&2
IDLE_CONNS=$N IDLE_SECS=${IDLE_SECS:-20} ONLY=c \
  bash "$HARNESS/scripts/versus.sh" "$GW" --heartbeat 15 --idle-timeout 60 --replay 1000 |
  python3 -c '
import json, sys
for line in sys.stdin:
    run = json.loads(line)
    proxies = [w for w in run.get("watch", []) if w["name"] != "upstream"]
    for w in proxies or run.get("watch", []):
        print("{:16} open {}/{} errors {} comments/stream/s {:.2f} {:9} RSS per stream {:.1f} KB".format(
            run["label"], run["connections_open_at_end"], run["conns"], run["errors"],
            run["comments_per_conn_per_sec"], w["name"], w["rss_per_conn_bytes_end"] / 1000))
'
