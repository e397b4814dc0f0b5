"""`lamina bench fleet`: what a cache-aware router buys a fleet, measured.

A loopback fleet of `--replicas` lamina processes (one thread each by default) serves
the same workload behind (a) nginx with deploy/nginx/nginx.conf (least connections) and
(b) SGLang's model gateway (`sglang-router`, cache-aware). The workload: `--conversations`
multi-turn chats, 4 to 6 turns each, prompts growing with the history, every chat
opening with one of `--system-prompts` long shared system prompts; `--concurrency`
clients in a closed loop, each running whole conversations, so several are interleaved.
Each setup gets system prompts of its own (a salt), so no setup reads another's cache.

Per setup: prefix-cache hit rate (the replicas' own counters: tokens found / tokens
looked up), TTFT p50/p99, requests/s, errors. `--drain` adds a run behind the router in
which the replica that served most of it gets SIGTERM halfway: its count of failed
requests. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from app.bench import fleet
from app.bench.out_file import add_json_out
from app.bench.serve_client import RequestRecord
from app.bench.serve_stats import percentile

# Words the system prompts and questions are drawn from (a seeded choice).
WORDS = [
    "answer", "questions", "about", "the", "invoice", "ledger", "policy", "shipping",
    "refund", "account", "customer", "order", "warranty", "delivery", "address", "payment",
    "schedule", "contract", "service", "region", "product", "support", "escalation",
    "priority", "report", "summary", "detail", "reference", "clause", "section",
]  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lamina bench fleet", description=__doc__)
    parser.add_argument("--model", help="model folder (default: LAMINA_MODEL or the default)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="LAMINA_NUM_THREADS per replica")
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain", action="store_true", help="add the drain run")
    parser.add_argument("--setups", default="nginx,router", help="which fronts, in order")
    add_json_out(parser, Path("bench_results/fleet_bench.json"))
    return parser.parse_args(argv)


@dataclass
class SetupResult:
    name: str
    num_requests: int
    num_errors: int
    duration_s: float
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    prefix_hit_rate: float | None  # tokens found / tokens looked up, all replicas
    prompt_tokens_looked_up: float
    prompt_tokens_recomputed: float  # looked up and not found: prefill work
    per_replica_hits: list[float | None]  # None: the drained replica (its counters went with it)
    errors: list[str] = field(default_factory=list)
    drained_replica: str | None = None


def system_prompts(count: int, num_words: int, salt: str, rng: random.Random) -> list[str]:
    return [
        f"[{salt}] You are assistant {i}. " + " ".join(rng.choice(WORDS) for _ in range(num_words))
        for i in range(count)
    ]


async def run_conversation(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    system: str,
    turns: int,
    args: argparse.Namespace,
    rng: random.Random,
    records: list[RequestRecord],
) -> None:
    """One chat, turn after turn; each reply joins the history the next turn sends."""
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        question = " ".join(rng.choice(WORDS) for _ in range(12))
        messages.append({"role": "user", "content": f"Question {turn}: {question}?"})
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        reply, record = await stream_chat(client, url + "/v1/chat/completions", body)
        records.append(record)
        messages.append({"role": "assistant", "content": reply or "(no reply)"})


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, RequestRecord]:
    """POST one streamed chat turn: its timings (TTFT from the first content chunk) and
    the reply's text, which the conversation's next turn sends back."""
    start = time.perf_counter()
    record, pieces = RequestRecord(ok=False), []
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                record.error = f"HTTP {response.status_code}: {text}"
                return "", record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    record.error = str(payload["error"])
                    return "", record
                if payload.get("usage"):
                    record.output_tokens = payload["usage"].get("completion_tokens", 0)
                for choice in payload.get("choices", []):
                    text = choice.get("delta", {}).get("content") or ""
                    # The first chunk carries only the role: TTFT is the first text.
                    if text and record.ttft_s is None:
                        record.ttft_s = time.perf_counter() - start
                    pieces.append(text)
        record.ok = record.error is None
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.e2e_s = time.perf_counter() - start
    return "".join(pieces), record


async def drive(url: str, model: str, prompts: list[str], args, on_half=None) -> tuple:
    """Run every conversation through `url` with `args.concurrency` clients."""
    rng = random.Random(args.seed)
    plan = [(prompts[i % len(prompts)], 4 + i % 3) for i in range(args.conversations)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    records: list[RequestRecord] = []
    total_turns = sum(turns for _, turns in plan)
    half_fired = False

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal half_fired
        while not queue.empty():
            system, turns = queue.get_nowait()
            await run_conversation(client, url, model, system, turns, args, rng, records)
            if on_half is not None and not half_fired and len(records) >= total_turns // 2:
                half_fired = True
                on_half()

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(args.concurrency)))
    return records, time.perf_counter() - started


def measure(name: str, members: list[fleet.Replica], front, model: str, args, drain=False):
    """One setup: its own system prompts, counters read before and after."""
    rng = random.Random(f"{args.seed}-{name}")
    prompts = system_prompts(args.system_prompts, args.system_words, f"{name}-{time.time()}", rng)
    before = [fleet.prefix_cache_counts(m.url) for m in members]
    drained: list[str] = []

    def drain_busiest() -> None:
        hits = [fleet.prefix_cache_counts(m.url)[1] - b[1] for m, b in zip(members, before)]
        busiest = members[hits.index(max(hits))]
        busiest.process.send_signal(signal.SIGTERM)
        drained.append(busiest.url)

    with front(members) as url:
        records, duration_s = asyncio.run(
            drive(url, model, prompts, args, drain_busiest if drain else None)
        )
    alive = [(m, b) for m, b in zip(members, before) if m.process.poll() is None]
    after = {m.url: fleet.prefix_cache_counts(m.url) for m, _ in alive}
    looked_up = sum(after[m.url][0] - b[0] for m, b in alive)
    found = [after[m.url][1] - b[1] if m.url in after else None for m, b in zip(members, before)]
    ttft = [r.ttft_s for r in records if r.ok and r.ttft_s is not None]
    errors = [r.error or "" for r in records if not r.ok]
    return SetupResult(
        name=name,
        num_requests=len(records),
        num_errors=len(errors),
        duration_s=round(duration_s, 2),
        requests_per_s=round(len(records) / duration_s, 3),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        # With a drained replica its counters are gone: the rate is over the others.
        prefix_hit_rate=(sum(f for f in found if f is not None) / looked_up) if looked_up else None,
        prompt_tokens_looked_up=looked_up,
        prompt_tokens_recomputed=looked_up - sum(f for f in found if f is not None),
        per_replica_hits=found,
        errors=errors[:5],
        drained_replica=drained[0] if drained else None,
    )


def _commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=fleet.ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def write_png(results: list[SetupResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.drained_replica is None]
    names = [r.name for r in runs]
    fig, (hits, ttft) = plt.subplots(1, 2, figsize=(9, 3.6))
    hits.bar(names, [100 * (r.prefix_hit_rate or 0) for r in runs], color=["#888", "#2a7"])
    hits.set_ylabel("prefix-cache hit rate (%)")
    hits.set_ylim(0, 100)
    width = 0.38
    xs = range(len(runs))
    ttft.bar([x - width / 2 for x in xs], [r.ttft_p50_s or 0 for r in runs], width, label="p50")
    ttft.bar([x + width / 2 for x in xs], [r.ttft_p99_s or 0 for r in runs], width, label="p99")
    ttft.set_xticks(list(xs), names)
    ttft.set_ylabel("time to first token (s)")
    ttft.legend()
    fig.suptitle("lamina bench fleet: multi-turn chats, shared system prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    env = {"LAMINA_NUM_THREADS": str(args.threads), "LAMINA_KV_CACHE_GB": "0.5"}
    if args.model:
        env["LAMINA_MODEL"] = args.model
    fronts = {"nginx": fleet.nginx, "router": fleet.router}
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    load_before = os.getloadavg()
    results: list[SetupResult] = []
    with fleet.replicas(args.replicas, env) as members:
        model = httpx.get(members[0].url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for name in setups:
            print(f"[bench fleet] {name} ...", flush=True)
            results.append(measure(name, members, fronts[name], model, args))
        if args.drain:
            print("[bench fleet] router with a drain halfway ...", flush=True)
            results.append(measure("router-drain", members, fleet.router, model, args, True))
    by_name = {r.name: r for r in results}
    ratios = {}
    if "nginx" in by_name and "router" in by_name:
        a, b = by_name["nginx"], by_name["router"]
        if a.prefix_hit_rate and b.prefix_hit_rate is not None:
            ratios["hit_rate_router_over_nginx"] = round(b.prefix_hit_rate / a.prefix_hit_rate, 2)
        if b.prompt_tokens_recomputed:
            ratios["recomputed_tokens_nginx_over_router"] = round(
                a.prompt_tokens_recomputed / b.prompt_tokens_recomputed, 2
            )
        if a.ttft_p50_s and b.ttft_p50_s:
            ratios["ttft_p50_router_over_nginx"] = round(b.ttft_p50_s / a.ttft_p50_s, 2)
    report = {
        "benchmark": "lamina bench fleet",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "model": model,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "setups": [asdict(r) for r in results],
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    write_png(results, png)
    for r in results:
        rate = "n/a" if r.prefix_hit_rate is None else f"{100 * r.prefix_hit_rate:.1f}%"
        print(
            f"{r.name:>13}: hit rate {rate}, TTFT p50 {r.ttft_p50_s or 0:.3f} s "
            f"p99 {r.ttft_p99_s or 0:.3f} s, {r.requests_per_s} req/s, "
            f"{r.num_errors}/{r.num_requests} errors"
        )
    print(f"ratios: {ratios}\nwrote {args.out} and {png}")
    return 0 if not any(r.num_errors for r in results) else 1
