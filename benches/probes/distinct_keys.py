"""Short connections on distinct query strings: how much does the gateway keep?

    python3 benches/probes/distinct_keys.py target/debug/examples/gateway [GATEWAY ARGS...]

Starts the gateway's demo (--replay 1000 --demo-rate 1000 --demo-size 2048 --heartbeat 0 plus
ARGS) on 127.0.0.1, makes 1,500 connections of 0.5 s each to /events?n=<n> (100 at a time), and
prints the gateway's RSS before, right after, and 5 s later. Compare, in one run, the default
budget with `--replay-max-bytes 100000000000 --replay-max-keys 100000` (no budget) and with a
small `--replay-max-bytes`.
"""
import asyncio
import re
import subprocess
import sys
import time

binary, extra = sys.argv[1], sys.argv[2:]
base_args = ["--listen", "127.0.0.1:0", "--replay", "1000", "--demo-rate", "1000",
             "--demo-size", "2048", "--heartbeat", "0"]
gateway = subprocess.Popen([binary] + base_args + extra, stdout=subprocess.PIPE, text=True)
port = int(re.search(r":(\d+)", gateway.stdout.readline().rsplit("http://", 1)[1]).group(1))


def rss_mib():
    for line in open(f"/proc/{gateway.pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024


async def one(n):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.write(f"GET /events?n={n} HTTP/1.1\r\nhost: probe\r\n\r\n".encode())
    await writer.drain()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        try:
            await asyncio.wait_for(reader.read(65536), end - time.monotonic())
        except asyncio.TimeoutError:
            break
    writer.close()


async def main():
    base = rss_mib()
    limit = asyncio.Semaphore(100)

    async def guarded(n):
        async with limit:
            await one(n)

    await asyncio.wait_for(asyncio.gather(*(guarded(n) for n in range(1500))), 120)
    after = rss_mib()
    await asyncio.sleep(5)
    print(f"args={extra} rss before={base} MiB, after={after} MiB (+{after - base}), "
          f"5 s later={rss_mib()} MiB")


try:
    asyncio.run(main())
finally:
    gateway.kill()
