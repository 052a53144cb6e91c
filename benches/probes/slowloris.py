"""Idle sockets against the gateway: are they closed by --header-timeout, and does the accept
loop stay calm when it runs out of file descriptors?

    python3 benches/probes/slowloris.py target/debug/examples/gateway [SOCKETS] [GATEWAY ARGS...]

Starts the gateway with `ulimit -n 1024` on 127.0.0.1, opens SOCKETS (default 1,100) sockets that
never send a byte, waits 5 s past the header timeout (give `--header-timeout 2`, say), then prints
how many the gateway closed, its CPU ticks meanwhile, its stderr line count, and whether a new
client is served. Everything stays on loopback and ends by itself.
"""
import re
import socket
import subprocess
import sys
import time

binary = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 1100
extra = sys.argv[3:]
wait = 5.0
for flag, value in zip(extra, extra[1:]):
    if flag == "--header-timeout":
        wait += float(value)

command = "ulimit -n 1024; exec " + " ".join([binary, "--listen", "127.0.0.1:0"] + extra)
gateway = subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
port = int(re.search(r":(\d+)$", gateway.stdout.readline().strip()).group(1))


def cpu_ticks():
    fields = open(f"/proc/{gateway.pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


sockets = []
try:
    for _ in range(count):
        sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
except OSError as error:
    print(f"opened {len(sockets)} sockets, then: {error}")
before = cpu_ticks()
time.sleep(wait)
ticks = cpu_ticks() - before
closed = 0
for s in sockets:
    s.settimeout(0.001)
    try:
        if s.recv(10) == b"":
            closed += 1
    except socket.timeout:
        pass
    except OSError:
        closed += 1
for s in sockets:
    s.close()
time.sleep(0.5)
start = time.time()
client = socket.create_connection(("127.0.0.1", port), timeout=10)
client.sendall(b"GET /events HTTP/1.1\r\nhost: probe\r\n\r\n")
status = client.recv(100).split(b"\r\n")[0].decode()
gateway.kill()
_, err = gateway.communicate(timeout=5)
print(f"{closed}/{len(sockets)} idle sockets closed by the gateway within {wait:.0f} s; "
      f"gateway CPU {ticks} ticks; stderr lines {len(err.splitlines())}; "
      f"new client: {status!r} in {time.time() - start:.2f} s")
