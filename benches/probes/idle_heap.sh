#!/usr/bin/env bash
# Where a proxied idle stream's heap goes: valgrind massif of the gateway holding N idle streams.
#
#   bash benches/probes/idle_heap.sh target/release/examples/gateway HARNESS_BIN_DIR [N]
#
# HARNESS_BIN_DIR holds the harness's sse-axum and sse-load (../shared/harness, built with
# `cargo build --release`). Starts sse-axum (KeepAlive 1 s) and the gateway under massif with
# the full stack (--heartbeat 15 --idle-timeout 60 --replay 1000), opens N (default 500) idle
# streams through it, then stops it and prints the heap per stream of the largest snapshot,
# grouped by the first frame outside the allocator, std and bytes. Loopback only.
set -euo pipefail
GW=$1; B=$2; N=${3:-500}
OUT=$(mktemp)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); GP=$(free_port)
"$B/sse-axum" --listen "127.0.0.1:$UP" --keepalive-ms 1000 --exit-after 300 >/dev/null 2>&1 & U=$!
valgrind --tool=massif --massif-out-file="$OUT" --detailed-freq=1 --max-snapshots=40 --threshold=0.5 \
  "$GW" --listen "127.0.0.1:$GP" --upstream "http://127.0.0.1:$UP" --heartbeat 15 --idle-timeout 60 --replay 1000 >/dev/null 2>&1 & G=$!
sleep 6
"$B/sse-load" --label idle --url "http://127.0.0.1:$GP/" --conns "$N" --idle --secs 5 --settle 3 --ramp-concurrency 20 >/dev/null 2>&1
kill -INT "$G"; sleep 3; kill "$G" "$U" 2>/dev/null || true; wait 2>/dev/null || true
python3 - "$OUT" "$N" <<'PY'
import collections, re, sys
path, n = sys.argv[1], int(sys.argv[2])
snaps = open(path).read().split('snapshot=')[1:]
best = max(snaps, key=lambda s: int(re.search(r'mem_heap_B=(\d+)', s).group(1)))
stack, leaves = [], []
for line in best.split('\n'):
    m = re.match(r'(\s*)n(\d+): (\d+) (.*)', line)
    if not m:
        continue
    depth, children, size = len(m.group(1)), int(m.group(2)), int(m.group(3))
    name = re.sub(r' \(in .*\)$', '', re.sub(r'^0x[0-9A-F]+: ', '', m.group(4)))
    while stack and stack[-1][0] >= depth:
        stack.pop()
    stack.append((depth, name))
    if children == 0:
        leaves.append((size, [s[1] for s in stack]))
skip = ('alloc::', 'bytes::', 'core::', 'std::', 'RawVec', 'malloc', '<alloc', 'hashbrown', '__rust')
owners = collections.Counter()
for size, chain in leaves:
    owner = next((f for f in chain[1:] if not any(k in f for k in skip)), chain[-1])
    owners[owner[:110]] += size
print(f"heap per stream: {sum(owners.values()) / n / 1024:.1f} KB (largest snapshot, {n} streams)")
for owner, size in owners.most_common(12):
    print(f"{size / n / 1024:7.2f} KB  {owner}")
PY
rm -f "$OUT"
