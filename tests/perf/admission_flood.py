"""A small request behind a flood (issue 16, D2), on a real `lamina serve` of a tiny
random LLaMA with a tiny KV cache: client A opens 16 streams of n=4 x 300 tokens
(ignore_eos), about ten times what the cache holds; a second later client B asks for 2
tokens. Prints B's latency (429s retried after Retry-After), the flood's wall time and
its retries, and the preemptions, for each admission configuration, interleaved and
repeated:

    python -m tests.perf.admission_flood [--repeats 2] [--kv-cache-gb 0.001]

- `bounded`: the defaults (token budget = the KV cache, fair share 0.5);
- `unbounded`: LAMINA_MAX_ADMITTED_TOKENS and LAMINA_MAX_QUEUED_SEQUENCES far above what
  the cache holds and LAMINA_MAX_CLIENT_SHARE=1, i.e. only the request count bounds the
  queue, as before the work was weighed (the scheduler still takes turns by client).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from tests.server_process import REPO_ROOT, ServerProcess

KEYS = ("key-a", "key-b")
CONFIGS = {
    "bounded": {},
    "unbounded": {
        "LAMINA_MAX_ADMITTED_TOKENS": "100000000",
        "LAMINA_MAX_QUEUED_SEQUENCES": "100000",
        "LAMINA_MAX_CLIENT_SHARE": "1",
    },
}


def tiny_model(out: Path) -> Path:
    from tests.model.helpers import save_random_llama  # imports torch

    save_random_llama(out, vocab_size=49152, intermediate_size=128,
                      max_position_embeddings=1024, pad_token_id=2)  # fmt: skip
    source = REPO_ROOT / "model_weights/smollm2-135m-instruct"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, out / name)
    return out


async def until_admitted(client: httpx.AsyncClient, key: str, body: dict) -> tuple[int, int]:
    """(status, 429s before it) of a client that honours Retry-After."""
    for refusals in range(1000):
        response = await client.post(
            "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        if response.status_code != 429:
            return response.status_code, refusals
        await asyncio.sleep(float(response.headers["retry-after"]))
    raise RuntimeError("never admitted")


def preemptions(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^lamina:num_preemptions_total\{.*\} (\S+)$", text, re.M).group(1))


async def flood_and_small(url: str) -> dict[str, float]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        big = {"prompt": "tell me a long story", "n": 4, "max_tokens": 300, "ignore_eos": True}
        started = time.monotonic()
        flood = [asyncio.ensure_future(until_admitted(client, KEYS[0], big)) for _ in range(16)]
        await asyncio.sleep(1.0)
        small_started = time.monotonic()
        status, small_refusals = await until_admitted(
            client, KEYS[1], {"prompt": "hi", "max_tokens": 2}
        )
        small_s = time.monotonic() - small_started
        outcomes = await asyncio.gather(*flood)
        assert status == 200 and all(s == 200 for s, _ in outcomes), (status, outcomes)
        return {
            "small_s": small_s,
            "small_429s": small_refusals,
            "flood_s": time.monotonic() - started,
            "flood_429s": sum(r for _, r in outcomes),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-cache-gb", default="0.001")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model(Path(folder))
        base = {
            "LAMINA_DEVICE": "cpu",
            "LAMINA_NUM_THREADS": "1",
            "LAMINA_MODEL": str(model),
            "LAMINA_KV_CACHE_GB": args.kv_cache_gb,
            "LAMINA_API_KEYS": ",".join(KEYS),
        }
        servers = {name: ServerProcess(extra_env={**base, **env}) for name, env in CONFIGS.items()}
        try:
            for server in servers.values():
                server.start(300)
            for repeat in range(args.repeats):
                for name, server in servers.items():
                    before = preemptions(server.url)
                    figures = asyncio.run(flood_and_small(server.url))
                    figures["preemptions"] = preemptions(server.url) - before
                    shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
                    print(f"{name} #{repeat + 1}: {shown}", flush=True)
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
