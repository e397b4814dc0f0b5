"""Resident memory of a real `lamina serve`: at ready, after a burst of concurrent
streams, and after a second identical burst (docs/performance.md, "Host memory").

    python -m tests.perf.memory_rss [--streams 32] [--max-tokens 128]

Starts the server through tests/server_process.py with no LAMINA_* variable but the port
(the default model and settings; set LAMINA_* here to change them, e.g.
LAMINA_NATIVE_KERNELS=false) and prints RSS from /proc/PID/smaps_rollup, then the
start-up log's memory line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import httpx

from tests.reliability.clients import stream_body, stream_request
from tests.server_process import ServerProcess


def rollup_mib(pid: int) -> dict[str, int]:
    """Rss, Anonymous and AnonHugePages of the process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        if name.rstrip(":") in ("Rss", "Anonymous", "AnonHugePages"):
            fields[name.rstrip(":")] = int(value) // 1024
    return fields


async def burst(url: str, streams: int, max_tokens: int) -> None:
    async with httpx.AsyncClient(timeout=1800) as client:
        bodies = [
            stream_body("chat", f"Tell me a story number {i} about a cat.", max_tokens)
            for i in range(streams)
        ]
        outcomes = await asyncio.gather(
            *(stream_request(client, url, "chat", body) for body in bodies)
        )
    if not all(o.complete for o in outcomes):
        raise RuntimeError(f"incomplete streams: {[o for o in outcomes if not o.complete]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    env = {"LAMINA_KV_CACHE_GB": ""}  # the default, not the test helper's small cache
    env.update({k: v for k, v in os.environ.items() if k.startswith("LAMINA_")})
    with ServerProcess(extra_env=env) as server:
        pid = server.process.pid
        print("ready", rollup_mib(pid), flush=True)
        for name in ("after the burst", "after a second burst"):
            asyncio.run(burst(server.url, args.streams, args.max_tokens))
            print(name, rollup_mib(pid), flush=True)
        for line in server.log_path.read_text().splitlines():
            if " memory: " in line:
                print(line)


if __name__ == "__main__":
    main()
