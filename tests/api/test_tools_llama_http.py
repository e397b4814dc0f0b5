"""Tool calls in the Llama 3 JSON format over HTTP, for a model whose template writes them.

The served tokenizer carries a Llama 3 style template (tests/tool_schemas.py): tools in
the first user turn, calls as `{"name": ..., "parameters": ...}`, results in `ipython`
turns. The fake engine replies a fixed text; the real constraint compiler proves the
grammar the request got is the Llama 3 one, and the answers prove the Llama 3 parser
reads calls the same streamed and whole.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.structured import ConstraintCompiler
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine
from tests.tool_schemas import LLAMA_TEMPLATE, WEATHER, tokenizer_with_template

pytestmark = pytest.mark.anyio
TIME = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in (("get_weather", WEATHER), ("get_time", TIME))
]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]
WEATHER_ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
REPLY = (
    f'{{"name": "get_weather", "parameters": {WEATHER_ARGUMENTS}}}; '
    '{"name": "get_time", "parameters": {"timezone": "CET"}}'
)
EXPECTED_CALLS = [("get_weather", WEATHER_ARGUMENTS), ("get_time", '{"timezone": "CET"}')]


@pytest.fixture
async def llama_app(
    default_model_path: Path, tmp_path: Path, grammar_tok
) -> AsyncIterator[FakeApp]:
    tokenizer = tokenizer_with_template(default_model_path, tmp_path, LLAMA_TEMPLATE)
    engine = FakeEngine(tokenizer)
    engine.reply = REPLY
    settings = fake_settings(default_model_path)
    async with running_fake_app(settings, engine, ConstraintCompiler(grammar_tok)) as app:
        yield app


async def post_chat(app: FakeApp, **body: object):
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 200, **body}
    return await app.client.post("/v1/chat/completions", json=body)


async def test_required_calls_get_the_llama3_grammar_and_parse_whole(llama_app: FakeApp) -> None:
    """One call an answer (Llama 3 templates take one back), whatever parallel_tool_calls."""
    llama_app.engine.reply = REPLY.split("; ")[0]
    response = await post_chat(llama_app, tool_choice="required")
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == EXPECTED_CALLS[
        :1
    ]
    # The request's grammar takes the reply, token by token: it is the Llama 3 one.
    request = llama_app.engine.requests[-1]
    matcher = request.params.constraint.new_matcher()
    assert all(matcher.advance(token) for token in llama_app.engine.reply_ids()[:-1])
    assert matcher.is_finished  # one call, and nothing after it
    prompt = llama_app.engine.tokenizer.decode(request.prompt_token_ids, False)
    assert prompt.startswith("<|im_start|>user\nAnswer with a call as")  # the template's own


async def test_a_streamed_answer_gives_the_same_calls(llama_app: FakeApp) -> None:
    """Calls joined by `; ` (which the parser reads, whatever the grammar asked)."""
    response = await post_chat(llama_app, stream=True)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line[:7] == "data: {"]
    deltas = [event["choices"][0]["delta"] for event in events if event["choices"]]
    assert not "".join(delta.get("content") or "" for delta in deltas)
    fragments = [call for delta in deltas for call in delta.get("tool_calls", ())]
    names = [f["function"]["name"] for f in fragments if "id" in f]
    arguments = [
        "".join(f["function"]["arguments"] for f in fragments if f["index"] == i) for i in (0, 1)
    ]
    assert list(zip(names, arguments)) == EXPECTED_CALLS and len(fragments) > 4
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_text_is_content_and_a_second_turn_renders_natively(llama_app: FakeApp) -> None:
    llama_app.engine.reply = "It is sunny in Paris."
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": WEATHER_ARGUMENTS}
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    response = await post_chat(llama_app, messages=conversation)
    choice = response.json()["choices"][0]
    assert (
        choice["message"]["content"] == "It is sunny in Paris."
        and choice["finish_reason"] == "stop"
    )
    assert "tool_calls" not in choice["message"]
    prompt = llama_app.engine.tokenizer.decode(
        llama_app.engine.requests[-1].prompt_token_ids, False
    )
    assert f'{{"name": "get_weather", "parameters": {WEATHER_ARGUMENTS}}}' in prompt
    assert "<|im_start|>ipython\n21 degrees<|im_end|>" in prompt
