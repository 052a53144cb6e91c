#!/usr/bin/env bash
# What the Redis replay store keeps per retained event.
#
#   bash benches/probes/redis_keys.sh target/debug/examples/gateway
#
# Starts a redis-server and two gateways on 127.0.0.1 (the demo source at 1,000 events/s, and a
# proxy with --redis --replay 100 in front of it), reads the stream for 3 s, then prints Redis's
# number of keys, the entries of the stream and of its id index. Everything stops by itself.
set -euo pipefail
GW=$1
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port); UP=$(free_port); PP=$(free_port)
DIR=$(mktemp -d)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" --daemonize yes >/dev/null
cleanup() { kill "$G" "$U" 2>/dev/null || true; redis-cli -p "$RP" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$DIR"; }
sleep 0.3
"$GW" --listen "127.0.0.1:$UP" --demo-rate 1000 --heartbeat 0 >/dev/null 2>&1 & U=$!
"$GW" --listen "127.0.0.1:$PP" --upstream "http://127.0.0.1:$UP" --redis "redis://127.0.0.1:$RP/" --replay 100 --heartbeat 0 >/dev/null 2>&1 & G=$!
trap cleanup EXIT
sleep 1
timeout 3 curl -sN "http://127.0.0.1:$PP/events" >/dev/null || true
sleep 0.5
STREAM=$(redis-cli -p "$RP" --scan --pattern '*:s' | head -1)
echo "keys $(redis-cli -p "$RP" dbsize), stream entries $(redis-cli -p "$RP" xlen "$STREAM"), index entries $(redis-cli -p "$RP" hlen "${STREAM%s}i")"
