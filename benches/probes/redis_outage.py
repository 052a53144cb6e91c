"""Redis goes away under live traffic: what does a reconnecting client lose?

    python3 benches/probes/redis_outage.py target/debug/examples/gateway [GATEWAY ARGS...]

Starts a redis-server (no persistence) and two gateways on 127.0.0.1: the upstream, the
gateway's own demo source at 50 events/s (it resumes after a Last-Event-ID, but the proxy is
not told so), and the proxy under test with `--redis --fanout --replay 1000` plus ARGS. A client
keeps one stream open throughout (the hub's subscription stays up); another reconnects every
0.4 s with the id of the last event it got. Redis is killed for 3 s, then restarted empty.
Prints, per phase (before, during the outage, after), the reconnects (and how many got no event
within their 0.4 s), the events missed (ids skipped between one reconnect's last event and the
next one's first, counted in the phase of the later one), duplicates, the median time to a
reconnect's first event, and the `sse-resumed-from` values and history-lost events seen. Everything stays on loopback and ends by
itself (about 10 s).
"""
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

binary, extra = sys.argv[1], sys.argv[2:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


redis_port = free_port()
redis_dir = tempfile.mkdtemp(prefix="redis-outage-")


def start_redis():
    return subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", redis_dir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_gateway(args):
    process = subprocess.Popen([binary, "--listen", "127.0.0.1:0"] + args,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(re.search(r":(\d+)", process.stdout.readline().rsplit("http://", 1)[1]).group(1))
    return process, port


def read_stream(port, last_id, seconds, on_event):
    """Reads /events for `seconds`; calls on_event(kind, value) for ids, resumed-from, lost."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    header = f"last-event-id: {last_id}\r\n" if last_id is not None else ""
    sock.sendall(f"GET /events HTTP/1.1\r\nhost: probe\r\n{header}\r\n".encode())
    sock.settimeout(0.1)
    end = time.monotonic() + seconds
    buffer = b""
    head_done = False
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        buffer += chunk
        if not head_done and b"\r\n\r\n" in buffer:
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            head_done = True
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"sse-resumed-from:"):
                    on_event("resumed", line.split(b":", 1)[1].strip().decode())
        # Chunked framing is left in; ids and event names are read line by line.
        for line in buffer.split(b"\n")[:-1]:
            line = line.strip(b"\r")
            if line.startswith(b"id: "):
                on_event("id", int(line[4:]))
            elif line.startswith(b"event: history-lost"):
                on_event("lost", "history-lost")
        buffer = buffer.rsplit(b"\n", 1)[-1]
    sock.close()


redis = start_redis()
time.sleep(0.5)
upstream, upstream_port = start_gateway(["--demo-rate", "50", "--heartbeat", "0"])
proxy, proxy_port = start_gateway(
    ["--upstream", f"http://127.0.0.1:{upstream_port}", "--redis",
     f"redis://127.0.0.1:{redis_port}/", "--fanout", "--replay", "1000", "--heartbeat", "0"]
    + extra)
time.sleep(1)

phase = "before"
stats = {name: {"reconnects": 0, "missed": 0, "dups": 0, "resumed": {}, "lost": 0,
                "empty": 0, "first_ms": []}
         for name in ("before", "outage", "after")}
keeper = threading.Thread(target=read_stream, args=(proxy_port, None, 9.0, lambda k, v: None))
keeper.start()
time.sleep(0.5)


def outage():
    global phase, redis
    time.sleep(2.5)
    phase = "outage"
    redis.kill()
    redis.wait()
    time.sleep(3)
    redis = start_redis()
    phase = "after"


threading.Thread(target=outage).start()
last = None
deadline = time.monotonic() + 8.0
while time.monotonic() < deadline:
    seen = []
    info = stats[phase]
    info["reconnects"] += 1
    started = time.monotonic()

    def on_event(kind, value, info=info, seen=seen, started=started):
        if kind == "id":
            if not seen:
                info["first_ms"].append((time.monotonic() - started) * 1000)
            seen.append(value)
        elif kind == "resumed":
            info["resumed"][value] = info["resumed"].get(value, 0) + 1
        elif kind == "lost":
            info["lost"] += 1

    read_stream(proxy_port, last, 0.4, on_event)
    if seen and last is not None:
        info["missed"] += max(0, seen[0] - last - 1)
        info["dups"] += sum(1 for n in seen if n <= last) + len(seen) - len(set(seen))
    if seen:
        last = seen[-1]
    else:
        info["empty"] += 1

keeper.join()
for process in (proxy, upstream, redis):
    process.kill()
shutil.rmtree(redis_dir, ignore_errors=True)
for name, info in stats.items():
    first = sorted(info["first_ms"])
    median = f"{first[len(first) // 2]:.0f} ms" if first else "-"
    print(f"{name:>7}: {info['reconnects']} reconnects ({info['empty']} got no event in 0.4 s), "
          f"{info['missed']} events missed, {info['dups']} duplicates, first event after "
          f"{median} (median), resumed-from {info['resumed']}, "
          f"{info['lost']} history-lost events")
