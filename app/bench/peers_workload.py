"""The closed-loop workloads of `lamina bench peers`, the same for every server.

`streams` clients each send their share of streaming requests in turn (a client sends
its next request when the previous one ends), `max_tokens` new tokens, greedy,
ignore_eos. Throughput is output tokens over the level's wall time.
- random: completions of `PROMPT_WORDS` seeded random words.
- repetitive: chats asking to rewrite a passage with its typos corrected
  (app/bench/repetitive.py), where most of the answer copies the prompt.
Prompts depend on (round, streams) only, so every server of a round does the same work;
their first words differ, so no request finds another's prefix in a cache.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx

from app.bench.serve_client import RequestRecord, stream_one
from app.bench.serve_stats import LevelSummary, summarize

PROMPT_WORDS = 64
MAX_TOKENS = 64

WORDS = (
    "river", "stone", "market", "window", "garden", "letter", "engine", "winter", "bridge",
    "silver", "forest", "harbor", "ladder", "candle", "mirror", "pocket", "signal", "tunnel",
    "yellow", "basket", "castle", "desert", "feather", "island", "jacket", "kettle", "lemon",
    "meadow", "needle", "orange", "pencil", "rabbit", "saddle", "thunder", "valley", "wagon",
    "anchor", "blanket", "cotton", "dragon", "empire", "falcon", "glacier", "hammer", "insect",
    "jungle", "kitchen", "lantern", "marble", "nephew", "oyster", "planet", "quarry", "ribbon",
    "shadow", "timber", "umbrella", "velvet", "walnut", "zenith", "copper", "button", "canyon",
    "the", "and", "of", "a", "to", "in", "is", "was", "with", "for", "on", "by", "under",
)  # fmt: skip


def word_prompts(count: int, seed: int | str, num_words: int = PROMPT_WORDS) -> list[str]:
    """`count` prompts of `num_words` words, reproducible from `seed`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(num_words)) for _ in range(count)]


def repetitive_chats(count: int, seed: int) -> list[list[dict]]:
    """The repetitive workload's chats, each opened by its own reference, so that no
    request of a level finds another's passage in a prefix cache."""
    from app.bench.repetitive import repetitive_messages

    chats = repetitive_messages(count)
    return [
        [{"role": "user", "content": f"(ref {seed}-{i}) {chat[0]['content']}"}]
        for i, chat in enumerate(chats)
    ]


def chat_body(model: str, messages: list[dict], max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def completion_body(model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }


async def _client(
    client: httpx.AsyncClient, url: str, bodies: list[dict], indices: range, records: list
) -> None:
    for index in indices:
        records[index] = await stream_one(client, url, bodies[index])


async def run_level(
    base_url: str, streams: int, bodies: list[dict], timeout_s: float = 900.0
) -> tuple[LevelSummary, list[RequestRecord]]:
    """`streams` clients share `bodies` (client i sends bodies[i::streams] in turn);
    the records come back in the order of `bodies`."""
    records: list = [None] * len(bodies)
    # A fresh connection per request: llama-server may close a kept-alive connection
    # just as the client reuses it ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=0)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    route = "chat/completions" if "messages" in bodies[0] else "completions"
    url = f"{base_url}/v1/{route}"
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        shares = [range(i, len(bodies), streams) for i in range(streams)]
        await asyncio.gather(*(_client(client, url, bodies, share, records) for share in shares))
        elapsed = time.perf_counter() - start
    return summarize(streams, records, elapsed), records


def served_model(base_url: str) -> str:
    """The first model id the server lists (llama-server lists its file's name)."""
    response = httpx.get(f"{base_url}/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]
