"""Thirty JSON schemas through the official `openai` client on the real server, all at
once: every output validates, greedy and sampled, streaming and not; and a constrained
request gives the same text alone as among 67 others, constrained or not (batch
invariance through HTTP).

The 135M model is weak: the grammar does the work. The engine-level twin of this test
is tests/engine/test_structured_engine.py.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from openai import AsyncOpenAI

from tests.api.conftest import LiveServer
from tests.engine.structured_schemas import SCHEMAS

pytestmark = [pytest.mark.system, pytest.mark.slow]
MAX_TOKENS = 160
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


def request(name: str, sampled: bool, stream: bool) -> dict:
    schema = SCHEMAS[name]
    ask = (
        f"Write a JSON value ({name.replace('_', ' ')}) matching this schema: {json.dumps(schema)}"
    )
    format_ = {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema, "strict": True},
    }
    fields = {**SAMPLED, "seed": 7} if sampled else {"temperature": 0}
    return {
        "model": "tgi",  # a placeholder: the served model, whatever it is
        "messages": [{"role": "user", "content": ask}],
        "response_format": format_,
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        **fields,
    }


async def answer(client: AsyncOpenAI, body: dict) -> tuple[str, str]:
    """(text, finish_reason) of one chat completion, streamed or not."""
    if not body["stream"]:
        choice = (await client.chat.completions.create(**body)).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = "", None
    async for chunk in await client.chat.completions.create(**body):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def free_request(index: int) -> dict:
    ask = f"Tell me about the number {index}."
    return {
        "model": "tgi",
        "messages": [{"role": "user", "content": ask}],
        "max_tokens": 24,
        "stream": index % 2 == 0,
        "temperature": 0,
    }


def test_thirty_schemas_validate_and_batching_changes_nothing(api_server: LiveServer) -> None:
    # 60 constrained requests: each schema greedy and seeded-sampled, half of them
    # streamed; and 8 free ones in the same crowd
    bodies = {
        (name, sampled): request(name, sampled, stream=(index + sampled) % 2 == 0)
        for index, name in enumerate(SCHEMAS)
        for sampled in (False, True)
    }
    watched = [("event", False), ("person", True)]  # also run alone, before the crowd

    async def run() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        client = AsyncOpenAI(base_url=api_server.url + "/v1", api_key="-", timeout=300)
        async with client:
            alone = [await answer(client, bodies[key]) for key in watched]
            crowd = [*bodies.values(), *(free_request(i) for i in range(8))]
            together = await asyncio.gather(*(answer(client, b) for b in crowd))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert len(SCHEMAS) >= 30
    results = dict(zip(bodies, together))  # the constrained ones; the free ones follow
    assert all(finish in ("stop", "length") for _, finish in together[len(bodies) :])
    for (name, sampled), (text, finish) in results.items():
        assert finish == "stop", (name, sampled, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    for key, lone in zip(watched, alone):
        assert results[key] == lone, f"{key} changed among 67 others"
