"""Batch invariance through HTTP: a greedy or seeded request returns exactly the same
token ids whether it runs alone or among 19 others sent at the same time.

Uses TGI's /generate with details, which returns every generated token id. The server
runs the default model cut to its first layers (`shallow_default_model_path`): the same
kernels, shapes and real weights, at a fifth of the cost; invariance holds layer by layer,
so depth adds time and no coverage (tests/perf/test_batch_invariance.py does the same).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.bench.corpus import PASSAGE

pytestmark = [pytest.mark.system, pytest.mark.slow]

NUM_NEW_TOKENS = 16
WORDS = PASSAGE.split()


def prompts() -> list[str]:
    """20 different prompts of varied lengths (6 to ~250 words) cut from the corpus."""
    return [" ".join(WORDS[7 * i : 7 * i + 6 + 13 * i]) for i in range(20)]


def body(index: int, prompt: str) -> dict:
    parameters = {"max_new_tokens": NUM_NEW_TOKENS, "details": True}
    if index >= 16:  # the last 4 are sampled, each with its own seed
        parameters.update(do_sample=True, temperature=0.9, top_p=0.95, seed=1000 + index)
    return {"inputs": prompt, "parameters": parameters}


async def generate(client: httpx.AsyncClient, url: str, payload: dict) -> list[int]:
    response = await client.post(url + "/generate", json=payload)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


# Crowds here test batching, not admission (as tests/api's shared server: api_server_env).
@pytest.mark.lamina_server(model="shallow_default_model_path", LAMINA_MAX_ADMITTED_TOKENS="65536")
def test_outputs_do_not_depend_on_batch_mates(lamina_server) -> None:
    payloads = [body(i, p) for i, p in enumerate(prompts())]
    lamina_server.wait_ready(300.0)

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        async with httpx.AsyncClient(timeout=300) as client:
            alone = [await generate(client, lamina_server.url, p) for p in payloads]
            together = await asyncio.gather(
                *(generate(client, lamina_server.url, p) for p in payloads)
            )
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert all(ids for ids in alone)
    mismatched = [i for i, (a, t) in enumerate(zip(alone, together)) if a != t]
    assert not mismatched, f"requests {mismatched} changed when batched"
