"""`lamina bench serve --structured [SCHEMA.json]`: constrained against free, over HTTP.

Each server gets two series, run in turn at every level so their ratio holds on a noisy
machine: free completions, and the same completions constrained by `response_format`
to a JSON array of objects valid against the schema, with more items required than
`--output-len` tokens can hold, so both write exactly `--output-len` tokens (EOS
ignored). Each series has its own prompts (no series reads another's prefix cache).
After the sweep, the schema's compile is timed as a client sees it: the latency of a
one-token request with a schema the server has not seen (cold), with the same schema
again (cached), and without one (free), medians of five.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import httpx

from app.bench.serve_client import Target
from app.bench.structured_bench import load_schema

CONSTRAINED_SEED_OFFSET = 500  # the constrained series' prompts differ from the free one's
COMPILE_REPEATS = 5


def response_format(schema: dict, name: str = "bench") -> dict:
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        }
    }


def stream_schema(schema: dict, output_len: int) -> dict:
    """An array of `schema` objects longer than `output_len` tokens can hold."""
    return {"type": "array", "items": schema, "minItems": output_len}


def structured_targets(name: str, url: str, args: argparse.Namespace) -> list[Target]:
    """The free and the constrained series of one server."""
    schema = stream_schema(load_schema(args.structured), args.output_len)
    return [
        Target(f"{name} free", url),
        Target(f"{name} json", url, response_format(schema), CONSTRAINED_SEED_OFFSET),
    ]


async def _latency_s(client: httpx.AsyncClient, url: str, body: dict) -> float:
    start = time.perf_counter()
    response = await client.post(f"{url}/v1/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - start


async def compile_times(url: str, model: str, schema: dict) -> dict[str, float]:
    """Median seconds of a one-token request: cold schema, cached schema, no schema."""
    body = {"model": model, "prompt": "Events:", "max_tokens": 1, "temperature": 0.0}
    samples: dict[str, list[float]] = {"cold": [], "cached": [], "free": []}
    async with httpx.AsyncClient(timeout=120) as client:
        await _latency_s(client, url, body)  # the prompt is in the prefix cache from here on
        for _ in range(COMPILE_REPEATS):
            fresh = {**schema, "description": f"bench {uuid.uuid4()}"}  # a new content hash
            constrained = {**body, **response_format(fresh)}
            samples["cold"].append(await _latency_s(client, url, constrained))
            samples["cached"].append(await _latency_s(client, url, constrained))
            samples["free"].append(await _latency_s(client, url, body))
    return {kind: statistics.median(values) for kind, values in samples.items()}


async def print_compile_times(name: str, url: str, model: str, args: argparse.Namespace) -> None:
    times = await compile_times(url, model, load_schema(args.structured))
    print(
        f"{name:>12} one-token request with the schema: cold {times['cold'] * 1e3:.1f} ms, "
        f"cached {times['cached'] * 1e3:.1f} ms, without {times['free'] * 1e3:.1f} ms "
        f"(medians of {COMPILE_REPEATS})",
        flush=True,
    )
