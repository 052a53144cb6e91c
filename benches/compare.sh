#!/usr/bin/env bash
# Side by side, in one run on this machine: the same upstream and load read directly, through
# nginx (proxy_buffering off, HTTP/1.1 upstream, one worker per core) and through the gateway
# with the full stack; then idle-stream memory of the gateway (full stack on its own demo source)
# against a plain axum `Sse` + `KeepAlive` server. Prints one JSON line per run and a table of
# medians and ratios at the end.
#
#   bash benches/compare.sh [SECS per run] [RUNS] [IDLE STREAMS]
#
# Needs nginx (installed with apt-get when missing) and python3. Everything listens on loopback.
set -euo pipefail
SECS=${1:-10}
RUNS=${2:-3}
IDLE=${3:-10000}
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && apt-get install -y -qq nginx-light || apt-get install -y -qq nginx
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --example gateway --example load --example axum_idle
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
bin=target/release/examples
work=$(mktemp -d)
results="$work/results.jsonl"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  exit 1
}

# Upstreams: the demo source with no layer work worth counting (no heartbeat, no first comment,
# no response timeout). A: as fast as the reader takes it, 256-byte events. B: 10 events/s.
upstream() {
  $bin/gateway --listen "127.0.0.1:$1" --heartbeat 0 --no-initial-comment --response-timeout 0 \
    --demo-size 256 --demo-rate "$2" >/dev/null &
  pids+=($!)
}
upstream 4200 1000000
upstream 4201 10

# The gateway with the full stack (what the README recommends): header policy, passthrough with
# a first comment, retry, heartbeat, lifetime, replay, idle and response timeouts.
full_stack() {
  $bin/gateway --listen "127.0.0.1:$1" --upstream "http://127.0.0.1:$2" --heartbeat 15 \
    --idle-timeout 60 --response-timeout 30 --retry 3000 --retry-jitter 1000 --max-lifetime 3600 \
    --replay 1000 >/dev/null &
  pids+=($!)
}
full_stack 4210 4200
full_stack 4211 4201
# The same gateway with no layer work but the header policy and a bare passthrough: the "bare
# hyper passthrough of the same body" the full stack is held to.
$bin/gateway --listen 127.0.0.1:4212 --upstream http://127.0.0.1:4200 --heartbeat 0 \
  --no-initial-comment --response-timeout 0 >/dev/null &
pids+=($!)

cat >"$work/nginx.conf" <<EOF
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $work/client_body;
  proxy_temp_path $work/proxy;
  fastcgi_temp_path $work/fastcgi;
  uwsgi_temp_path $work/uwsgi;
  scgi_temp_path $work/scgi;
  upstream a { server 127.0.0.1:4200; keepalive 64; }
  upstream b { server 127.0.0.1:4201; keepalive 64; }
  server {
    listen 127.0.0.1:4220;
    location / { proxy_pass http://a; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_read_timeout 3600s; }
  }
  server {
    listen 127.0.0.1:4221;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_read_timeout 3600s; }
  }
}
EOF
"$NGINX" -p "$work" -c "$work/nginx.conf" -g 'daemon off;' &
pids+=($!)
for port in 4200 4201 4210 4211 4212 4220 4221; do wait_port $port; done

load() { # label url conns
  $bin/load --url "$2/events" --conns "$3" --secs "$SECS" --label "$1" | tee -a "$results"
}
for _ in $(seq "$RUNS"); do
  load "max/direct" http://127.0.0.1:4200 50
  load "max/nginx" http://127.0.0.1:4220 50
  load "max/gateway" http://127.0.0.1:4210 50
  load "max/bare" http://127.0.0.1:4212 50
  load "10/s/direct" http://127.0.0.1:4201 1000
  load "10/s/nginx" http://127.0.0.1:4221 1000
  load "10/s/gateway" http://127.0.0.1:4211 1000
done

# Idle streams: RSS per stream of each server, holding $IDLE streams.
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
idle_memory() { # label pid url
  local before after ready="$work/ready-$1"
  sleep 1
  before=$(rss_kb "$2")
  $bin/load --url "$3" --conns "$IDLE" --secs 5 --idle --ready-file "$ready" --label "idle/$1" >"$work/idle-$1.json" &
  local load_pid=$!
  for _ in $(seq 600); do [ -f "$ready" ] && break; sleep 0.1; done
  sleep 2
  after=$(rss_kb "$2")
  wait "$load_pid"
  python3 - "$1" "$before" "$after" "$IDLE" "$work/idle-$1.json" <<'PY' | tee -a "$results"
import json, sys
label, before, after, conns, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
seen = json.load(open(path))
print(json.dumps({"label": "idle/" + label, "conns": conns, "rss_before_kb": before, "rss_after_kb": after,
                  "rss_per_stream_bytes": round((after - before) * 1024 / conns), "heartbeats": seen["heartbeats"],
                  "ended_early": seen["ended_early"]}))
PY
}
$bin/gateway --listen 127.0.0.1:4230 --demo-interval 86400000 --heartbeat 1 --idle-timeout 3600 \
  --replay 1000 >/dev/null &
gw=$!
pids+=($gw)
$bin/axum_idle 127.0.0.1:4231 >/dev/null &
ax=$!
pids+=($ax)
$bin/axum_idle 127.0.0.1:4232 stack >/dev/null &
axs=$!
pids+=($axs)
wait_port 4230
wait_port 4231
wait_port 4232
# The demo sends its first event at once; after it the stream stays idle (one per day).
idle_memory gateway "$gw" http://127.0.0.1:4230/events
idle_memory axum "$ax" http://127.0.0.1:4231/events
idle_memory axum-stack "$axs" http://127.0.0.1:4232/events

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def median(label, key):
    values = [r[key] for r in rows if r["label"] == label and key in r]
    return statistics.median(values) if values else float("nan")
def sub(label, key, sub_key):
    values = [r[key][sub_key] for r in rows if r["label"] == label]
    return statistics.median(values) if values else float("nan")
print()
print("| scenario | direct | nginx | gateway (full stack) | gateway / nginx | gateway / direct |")
print("|---|---|---|---|---|---|")
d, n, g = (median(f"max/{w}", "events_per_sec") for w in ("direct", "nginx", "gateway"))
print(f"| 50 conns, max rate, 256 B events: events/s | {d:,.0f} | {n:,.0f} | {g:,.0f} | {g/n:.2f}x | {g/d:.2f}x |")
for q in ("p50", "p99", "p999"):
    d, n, g = (sub(f"10/s/{w}", "latency_ms", q) for w in ("direct", "nginx", "gateway"))
    print(f"| 1,000 conns x 10 ev/s: {q} latency ms | {d:.2f} | {n:.2f} | {g:.2f} | {g/n:.2f}x | {g/d:.2f}x |")
b = median("max/bare", "events_per_sec")
g = median("max/gateway", "events_per_sec")
print(f"| 50 conns, max rate: gateway bare passthrough events/s | | | {b:,.0f} (full stack / bare: {g/b:.2f}x) | | |")
d, n, g = (median(f"10/s/{w}", "events_per_sec") for w in ("direct", "nginx", "gateway"))
print(f"| 1,000 conns x 10 ev/s: events/s | {d:,.0f} | {n:,.0f} | {g:,.0f} | {g/n:.2f}x | {g/d:.2f}x |")
idle = {r["label"]: r for r in rows if r["label"].startswith("idle/")}
if "idle/axum" in idle:
    a = idle["idle/axum"]["rss_per_stream_bytes"]
    print()
    print("| idle streams | streams | RSS per stream | ratio to axum |")
    print("|---|---|---|---|")
    for label, text in (("idle/axum", "axum Sse + KeepAlive(1 s)"),
                        ("idle/axum-stack", "same axum server, tower-sse full stack instead of KeepAlive"),
                        ("idle/gateway", "gateway binary, full stack on its demo source")):
        if label in idle:
            r = idle[label]
            print(f"| {text} | {r['conns']:,} | {r['rss_per_stream_bytes']:,} B | {r['rss_per_stream_bytes']/a:.2f}x |")
gaps = sum(r.get("gaps", 0) for r in rows)
dups = sum(r.get("duplicates", 0) for r in rows)
print(f"\nids: {gaps} gaps, {dups} duplicates in all runs")
PY
