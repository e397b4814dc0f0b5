"""`python -m tests.perf_http.measure_protocol`: the HTTP protocol's CPU cost per streamed
chunk, uvicorn's plain httptools protocol against lamina's guarded one
(app/server/protocol.py), interleaved in one run.

Each run starts a uvicorn process with a bare ASGI app that streams `--chunks` SSE-sized
chunks (one per token, as lamina's streams do) to one raw-socket client; the app reads
its own process CPU time (time.process_time, nanosecond clock) at the first and last
chunk, so start-up and the client do not count, and the machine's other load barely
does (CPU time, not wall time). Prints the per-run and median microseconds per chunk of
each side and their ratio.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

from tests.server_process import free_port

SERVER = r"""
import sys, time, uvicorn
from app.server.connections import ConnectionBook, ConnectionLimits
from app.server.protocol import guarded_protocol_class

side, port, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
CHUNK = b'data: {"choices":[{"index":0,"text":" token","logprobs":null}]}\n\n'

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    start = time.process_time()
    for _ in range(chunks):
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    cpu_s = time.process_time() - start
    await send({"type": "http.response.body", "body": b"cpu_s=%.9f\n" % cpu_s})

limits = ConnectionLimits(max_connections=64, header_timeout_s=10, body_timeout_s=30,
                          idle_timeout_s=75)
http = guarded_protocol_class(ConnectionBook(limits)) if side == "guarded" else "httptools"
uvicorn.run(app, host="127.0.0.1", port=port, http=http, ws="none", lifespan="off",
            log_level="warning", timeout_keep_alive=75)
"""


def one_run(side: str, chunks: int) -> float:
    """CPU microseconds per chunk of one server process of `side`."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, side, str(port), str(chunks)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=120)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        with sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        cpu_s = float(data.rsplit(b"cpu_s=", 1)[1].split(b"\n")[0])
        return cpu_s / chunks * 1e6
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"httptools": [], "guarded": []}
    for _ in range(args.repeat):
        for side in runs:  # interleaved: a load change hits both sides
            runs[side].append(one_run(side, args.chunks))
    for side, values in runs.items():
        shown = " ".join(f"{v:.2f}" for v in values)
        print(f"{side:9s} us/chunk median {statistics.median(values):.2f}  runs {shown}")
    ratios = [g / p for p, g in zip(runs["httptools"], runs["guarded"])]
    print(
        f"guarded / httptools: median {statistics.median(ratios):.3f}  "
        f"runs {' '.join(f'{r:.3f}' for r in ratios)}"
    )


if __name__ == "__main__":
    main()
