"""Serving overhead per token, without a model: `python -m tests.perf_http.measure_overhead`.

Starts overhead_server.py (lamina over a SleepRunner) in `--src` (a lamina checkout, so
two versions can be compared side by side), drives it with `lamina bench serve`'s
closed-loop streaming clients, and reports CPU microseconds per output token of the
server's event-loop thread, of its other threads (the engine thread, mostly) and of the
client. The model costs no CPU here, so these numbers are what HTTP, SSE, the event
loop, the scheduler, the detokenizer and delta delivery cost; CPU time is far less
sensitive to a noisy machine than wall-clock throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.bench.serve_bench import run_level
from app.bench.spawn import free_port, wait_until_serving

CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of process `pid`, by thread id."""
    times: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            times[int(tid)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_S
    return times


@dataclass
class OverheadResult:
    concurrency: int
    num_tokens: int
    output_tok_s: float
    event_loop_us_per_token: float
    other_threads_us_per_token: float
    client_us_per_token: float
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    itl_max_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    long_prompts: str  # the --long-prompt-len line, or ""

    def row(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        return (
            f"{self.concurrency:5d} {self.num_tokens:7d} {self.output_tok_s:8.0f} "
            f"{self.event_loop_us_per_token:9.1f} {self.other_threads_us_per_token:9.1f} "
            f"{self.client_us_per_token:9.1f} {ms(self.itl_p50_ms):>8} {ms(self.itl_p99_ms):>8}"
            f" {ms(self.itl_max_ms):>8}"
            f" {ms(self.ttft_p50_ms):>9} {ms(self.ttft_p99_ms):>9}{self.long_prompts}"
        )


HEADER = (
    f"{'conc':>5} {'tokens':>7} {'tok/s':>8} {'loop us':>9} {'other us':>9} "
    f"{'client us':>9} {'ITL p50':>8} {'ITL p99':>8} {'ITL max':>8} {'TTFT p50':>9} {'TTFT p99':>9}"
)


async def measure(url: str, pid: int, concurrency: int, args: argparse.Namespace):
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    before = thread_cpu_s(pid)
    client_before = time.process_time()
    summary = await run_level(url, model, concurrency, args)
    client_s = time.process_time() - client_before
    after = thread_cpu_s(pid)
    loop_s = after.get(pid, 0.0) - before.get(pid, 0.0)
    other_s = sum(t - before.get(tid, 0.0) for tid, t in after.items() if tid != pid)
    tokens = round(summary.output_tok_s * summary.duration_s)
    per_token = 1e6 / max(tokens, 1)
    return OverheadResult(
        concurrency=concurrency,
        num_tokens=tokens,
        output_tok_s=summary.output_tok_s,
        event_loop_us_per_token=loop_s * per_token,
        other_threads_us_per_token=other_s * per_token,
        client_us_per_token=client_s * per_token,
        itl_p50_ms=_ms(summary.itl_p50_s),
        itl_p99_ms=_ms(summary.itl_p99_s),
        itl_max_ms=_ms(summary.itl_max_s),
        ttft_p50_ms=_ms(summary.ttft_p50_s),
        ttft_p99_ms=_ms(summary.ttft_p99_s),
        long_prompts="\n" + summary.long_prompts_row() if summary.num_long_requests else "",
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, default=Path.cwd(), help="lamina checkout to run")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--step-ms", type=float, default=20.0, help="fixed time of a step")
    parser.add_argument("--per-seq-ms", type=float, default=0.0)
    parser.add_argument("--per-token-ms", type=float, default=0.0)
    parser.add_argument("--prefill-cap", type=int, help="prefill tokens while decoding; 0: none")
    parser.add_argument("--long-prompt-len", type=int, default=0)
    parser.add_argument("--long-prompt-rate", type=float, default=0.5)
    parser.add_argument("--long-output-len", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="measure each level this often")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    env = {**os.environ, "LAMINA_LOG_LEVEL": "warning", "PYTHONPATH": str(args.src)}
    command = [sys.executable, "-m", "tests.perf_http.overhead_server", "--port", str(port)]
    command += ["--step-ms", str(args.step_ms), "--per-seq-ms", str(args.per_seq_ms)]
    command += ["--per-token-ms", str(args.per_token_ms)]
    if args.prefill_cap is not None:
        command += ["--prefill-cap", str(args.prefill_cap)]
    server = subprocess.Popen(command, cwd=args.src, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server)
        print(f"src {args.src}, step {args.step_ms} ms\n{HEADER}", flush=True)
        for level in (int(c) for c in args.concurrency.split(",")):
            for _ in range(args.repeat):
                print(asyncio.run(measure(url, server.pid, level, args)).row(), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
