"""`lamina bench serve`: an HTTP load benchmark for any OpenAI-compatible server.

N streaming clients in a closed loop (each sends its next request when the previous
one ends), seeded random prompts of a fixed token length sent as token ids, a fixed
output length (ignore_eos), for a sweep of concurrencies. Reports output tokens/s,
requests/s, TTFT, inter-token and end-to-end latency percentiles and errors; writes
JSON and a PNG plot. `--spawn` starts lamina itself; `--baseline transformers` also
starts a static-batching transformers server and measures it in the same run.
`--spawn-variant NAME:VAR=VALUE` (repeated) starts one lamina server per setting and runs
every level on each in turn: two settings compared in one run (e.g. fp32 and bf16 weights).
`--structured [SCHEMA.json]` runs every level twice on each server, free and constrained
to a JSON schema (app/bench/serve_structured.py), and times the schema's compile.

`--long-prompt-len L` adds, at every level, open-loop arrivals of long-prompt requests
(`--long-prompt-rate` per second, `--long-output-len` tokens each) while the closed-loop
streams run: the streams' ITL p99 then shows how much prefill work stalls decoding, and
the long requests' own TTFT is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from app.bench.serve_client import RequestRecord, Target, completion_body, stream_one
from app.bench.serve_stats import LevelSummary, summarize
from app.bench.spawn import spawned_server


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lamina bench serve", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", help="model id (default: the server's first model)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="prompts differ by seed: vary it between runs "
        "against one server, or its prefix cache serves the repeated prompts",
    )
    parser.add_argument("--spawn", action="store_true", help="start a lamina server first")
    parser.add_argument(
        "--spawn-variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="start one lamina server per variant (environment settings, e.g. "
        "fp32:LAMINA_WEIGHT_DTYPE=float32) and run each level on every server in turn, "
        "so their figures come from the same minutes of a shared machine (repeatable)",
    )
    parser.add_argument(
        "--structured",
        nargs="?",
        const="builtin",
        metavar="SCHEMA.json",
        help="also run each level constrained to this JSON schema (an array of such objects, "
        "longer than --output-len), interleaved with the free run; without a file, a "
        "built-in event schema",
    )
    parser.add_argument("--baseline", choices=["none", "transformers"], default="none")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--long-prompt-len", type=int, default=0, help="0: no long prompts")
    parser.add_argument("--long-prompt-rate", type=float, default=0.5, help="arrivals per s")
    parser.add_argument("--long-output-len", type=int, default=8)
    parser.add_argument(
        "--long-prompt-count",
        type=int,
        default=0,
        help="at most this many (0: no limit); "
        "a fixed count keeps the work equal when comparing servers of different speeds",
    )
    return parser.parse_args(argv)


@dataclass
class ServerRun:
    name: str
    levels: list[LevelSummary]


def seeded_prompts(num: int, length: int, seed: int, vocab_size: int = 49152) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(length)] for _ in range(num)]


async def _client_loop(
    client: httpx.AsyncClient, url: str, bodies: list[dict], records: list, progress
) -> None:
    for body in bodies:
        records.append(await stream_one(client, url, body))
        progress.update(1)


async def _long_prompt_arrivals(
    client: httpx.AsyncClient,
    url: str,
    bodies: list[dict],
    rate_per_s: float,
    max_count: int,
    stop: asyncio.Event,
    records: list[RequestRecord],
) -> None:
    """Open loop: send bodies[i % len] every 1/rate s until `stop` is set or `max_count`
    were sent; then wait for all of them."""
    in_flight: list[asyncio.Task] = []

    async def one(body: dict) -> None:
        records.append(await stream_one(client, url, body))

    index = 0
    while not stop.is_set() and (max_count <= 0 or index < max_count):
        in_flight.append(asyncio.ensure_future(one(bodies[index % len(bodies)])))
        index += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0 / rate_per_s)
    await asyncio.gather(*in_flight)


def _start_long_prompts(client, url, model, concurrency, args, stop, records):
    """The --long-prompt-len arrivals as a task (None when off)."""
    if not getattr(args, "long_prompt_len", 0):
        return None
    prompts = seeded_prompts(8, args.long_prompt_len, args.seed + 1000 + concurrency)
    bodies = [completion_body(model, p, args.long_output_len) for p in prompts]
    return asyncio.ensure_future(
        _long_prompt_arrivals(
            client, url, bodies, args.long_prompt_rate, args.long_prompt_count, stop, records
        )
    )


async def run_level(
    base_url: str,
    model: str,
    concurrency: int,
    args: argparse.Namespace,
    body_extra: dict | None = None,
    seed_offset: int = 0,
) -> LevelSummary:
    """Run one concurrency level: `concurrency` clients, each sending its share in turn."""
    from tqdm import tqdm

    total = concurrency * args.requests_per_client
    prompts = seeded_prompts(total, args.prompt_len, args.seed + seed_offset + concurrency)
    bodies = [{**completion_body(model, p, args.output_len), **(body_extra or {})} for p in prompts]
    records: list[RequestRecord] = []
    longs: list[RequestRecord] = []  # --long-prompt-len requests
    long_len = getattr(args, "long_prompt_len", 0)
    limits = httpx.Limits(max_connections=concurrency + 4 + (64 if long_len else 0))
    timeout = httpx.Timeout(args.timeout_s, connect=30.0)
    url = f"{base_url}/v1/completions"
    with tqdm(total=total, desc=f"concurrency {concurrency:>3}", unit="req", leave=False) as bar:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            stop = asyncio.Event()
            arrivals = _start_long_prompts(client, url, model, concurrency, args, stop, longs)
            start = time.perf_counter()
            shares = [bodies[i::concurrency] for i in range(concurrency)]
            await asyncio.gather(*(_client_loop(client, url, s, records, bar) for s in shares))
            elapsed = time.perf_counter() - start
            stop.set()
            if arrivals is not None:
                await arrivals
    summary = summarize(concurrency, records, elapsed)
    if long_len:
        summary.add_long_prompts(longs)
    return summary


async def _first_model(base_url: str) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{base_url}/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]


async def sweep(name: str, base_url: str, args: argparse.Namespace) -> list[ServerRun]:
    return await sweep_interleaved({name: base_url}, args)


def targets_of(urls: dict[str, str], args: argparse.Namespace) -> list[Target]:
    """One series per server; with --structured, a free and a constrained one each."""
    if not getattr(args, "structured", None):
        return [Target(name, url) for name, url in urls.items()]
    from app.bench.serve_structured import structured_targets

    return [t for name, url in urls.items() for t in structured_targets(name, url, args)]


async def sweep_interleaved(urls: dict[str, str], args: argparse.Namespace) -> list[ServerRun]:
    """Every level on each series (see targets_of) in turn, the same prompt lengths for all."""
    targets = targets_of(urls, args)
    models = {t.url: args.model or await _first_model(t.url) for t in targets}
    levels = [int(c) for c in args.concurrency.split(",")]
    # One short request first, so no level pays for a cold start (a constrained one also
    # compiles its schema). Its own seed: a prompt of level 1 must not find itself in
    # the server's prefix cache.
    warmup = {"output_len": 4, "requests_per_client": 1, "long_prompt_len": 0, "seed": -1}
    for target in targets:
        warm_args = argparse.Namespace(**{**vars(args), **warmup})
        await run_level(target.url, models[target.url], 1, warm_args, target.body_extra)
    runs = {target.name: ServerRun(target.name, []) for target in targets}
    for level in levels:
        for target in targets:
            model = models[target.url]
            summary = await run_level(
                target.url, model, level, args, target.body_extra, target.seed_offset
            )
            print(f"{target.name:>12} {summary.table_row()}", flush=True)
            if summary.num_long_requests:
                print(f"{'':>12} {summary.long_prompts_row()}", flush=True)
            runs[target.name].levels.append(summary)
    if getattr(args, "structured", None):
        from app.bench.serve_structured import print_compile_times

        for name, url in urls.items():
            await print_compile_times(name, url, models[url], args)
    return list(runs.values())


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'bf16:LAMINA_WEIGHT_DTYPE=bfloat16,LAMINA_THREADS=2' -> (name, environment)."""
    name, _, settings = text.partition(":")
    pairs = [item.partition("=") for item in settings.split(",") if item]
    if not name or not pairs or any(not key or sep != "=" for key, sep, _ in pairs):
        raise ValueError(f"--spawn-variant {text!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
    return name, {key: value for key, _, value in pairs}


def run_variants(args: argparse.Namespace) -> list[ServerRun]:
    """One lamina server per --spawn-variant, all started first, levels interleaved."""
    variants = [parse_variant(text) for text in args.spawn_variant]
    with contextlib.ExitStack() as servers:
        urls = {}
        for name, env in variants:
            urls[name] = servers.enter_context(spawned_server("lamina", env))
        return asyncio.run(sweep_interleaved(urls, args))


def main(argv: list[str] | None = None) -> int:
    from app.bench.serve_report import write_plot, write_table

    args = parse_args(argv or [])
    if args.structured and args.baseline != "none":
        raise SystemExit("--structured: the transformers baseline has no response_format")
    runs: list[ServerRun] = []
    print(f"{'server':>12} {LevelSummary.table_header()}", flush=True)
    if args.spawn_variant:
        runs.extend(run_variants(args))
    elif args.spawn:
        with spawned_server("lamina") as url:
            runs.extend(asyncio.run(sweep("lamina", url, args)))
    else:
        runs.extend(asyncio.run(sweep("target", args.url.rstrip("/"), args)))
    if args.baseline == "transformers":
        with spawned_server("transformers") as url:
            runs.extend(asyncio.run(sweep("transformers", url, args)))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "workload": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": [{"server": r.name, "levels": [asdict(lv) for lv in r.levels]} for r in runs],
    }
    (args.out / "serve_bench.json").write_text(json.dumps(payload, indent=2, default=str))
    write_table(runs, args.out / "serve_bench.md")
    write_plot(runs, args.out / "serve_bench.png")
    print(f"results: {args.out}/serve_bench.json, .md, .png")
    failed = sum(lv.num_errors for r in runs for lv in r.levels)
    return 1 if failed else 0
