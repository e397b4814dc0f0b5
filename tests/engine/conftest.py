"""Fixtures for engine tests: one runner on the default model, transformers references,
and a check, after every test here, that no engine still holds a referenced KV block."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
import torch

from app.bench.corpus import PASSAGE
from app.config import load_settings
from app.core import SamplingParams, TokenDelta
from app.engine.engine import Engine
from app.engine.engine_core import EngineCore
from app.tokenizer import Tokenizer

NUM_NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0)
# (start, length) slices of the corpus: 8 prompts from 5 to 500 tokens.
PROMPT_SLICES = [(0, 5), (37, 19), (90, 64), (150, 121), (210, 200), (5, 287), (60, 403), (0, 500)]


@dataclass
class SizedRunner:
    """A runner wrapper that reports fewer KV blocks, to force preemption in tests."""

    inner: object
    num_blocks: int

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def execute(self, batch):  # noqa: ANN001, ANN201 - Runner protocol
        return self.inner.execute(batch)

    def release(self, seq_ids):  # noqa: ANN001, ANN201
        return self.inner.release(seq_ids)


@pytest.fixture(scope="session")
def tokenizer(default_model_path) -> Tokenizer:
    return Tokenizer(default_model_path)


@pytest.fixture(scope="session")
def corpus_ids(tokenizer) -> list[int]:
    ids = tokenizer.encode(PASSAGE)
    assert len(ids) >= 500, len(ids)
    return ids


@pytest.fixture(scope="session")
def parity_prompts(corpus_ids) -> list[list[int]]:
    return [corpus_ids[start : start + length] for start, length in PROMPT_SLICES]


@pytest.fixture(scope="session")
def hf_model(default_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    return model.eval()


def hf_greedy(model, prompt: list[int], num_new_tokens: int = NUM_NEW_TOKENS) -> list[int]:
    """transformers' own generate, greedy, fp32: the reference every engine path must equal."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=num_new_tokens,
            do_sample=False,
            pad_token_id=2,
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def hf_references(hf_model, parity_prompts) -> list[list[int]]:
    return [hf_greedy(hf_model, prompt) for prompt in parity_prompts]


@pytest.fixture(scope="session")
def repeating_prompt(corpus_ids) -> list[int]:
    """A 120-token passage twice, then its first 10 tokens: the model goes on copying."""
    passage = corpus_ids[200:320]
    return passage + passage + passage[:10]


@pytest.fixture(scope="session")
def cases(parity_prompts, hf_references, repeating_prompt, hf_model):
    """Speculative decoding's parity cases: (request id, prompt, transformers' greedy
    tokens) for 4 requests (3 of the parity references, computed once for
    test_greedy_parity too, and the repeating prompt, where drafts are mostly right)."""
    prompts = [*parity_prompts[:3], repeating_prompt]
    expected = [*hf_references[:3], hf_greedy(hf_model, repeating_prompt)]
    return [(f"r{i}", p, want) for i, (p, want) in enumerate(zip(prompts, expected))]


@pytest.fixture(scope="session")
def engine_settings(default_model_path):
    return load_settings(
        environ={}, model=default_model_path, kv_cache_gb=0.5, device="cpu", dtype="float32"
    )


@pytest.fixture(scope="session")
def runner(engine_settings):
    from app.model.runner import ModelRunner

    return ModelRunner.from_settings(engine_settings)


@pytest.fixture(autouse=True)
def no_kv_block_left_referenced(monkeypatch):
    """After every engine test: every EngineCore the test created (directly, through
    make_core, or inside a threaded Engine) holds no request and no KV block with a
    reference count above zero, and its block manager's books balance.

    A threaded Engine is checked once its thread has ended: the fixture stops any
    still running (shutdown) and requires it to be gone. The invariant is the same for
    an engine that was shut down, crashed or died of an exception: the dying thread
    ends every request it held with an error delta and frees its blocks (Engine._die),
    so a dead engine leaks nothing either. Blocks kept by the prefix cache with a
    reference count of zero are free, not leaked.
    """
    cores: list[EngineCore] = []
    engines: list[Engine] = []
    core_init, engine_init = EngineCore.__init__, Engine.__init__

    def recording_core_init(self, *args, **kwargs) -> None:  # noqa: ANN001
        core_init(self, *args, **kwargs)
        cores.append(self)

    def recording_engine_init(self, *args, **kwargs) -> None:  # noqa: ANN001
        engine_init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(EngineCore, "__init__", recording_core_init)
    monkeypatch.setattr(Engine, "__init__", recording_engine_init)
    yield
    for engine in engines:
        thread = engine._thread
        if thread is not None:
            engine.shutdown(timeout_s=10.0)  # a no-op message if the thread already ended
            assert not thread.is_alive(), "the engine thread did not stop"
    for core in cores:
        assert not core.has_unfinished(), "a request is still held by the engine"
        core.block_manager.check_invariants()
        assert core.block_manager.num_used_blocks == 0, "a KV block is still referenced"
        # A draft model's own cache (LAMINA_SPECULATIVE=draft) must be empty too.
        draft_blocks = getattr(core.scheduler.speculator, "block_manager", None)
        if draft_blocks is not None:
            draft_blocks.check_invariants()
            assert draft_blocks.num_used_blocks == 0, "a draft model's KV block is still held"


@pytest.fixture
def make_core(runner, tokenizer, engine_settings):
    """Build an EngineCore over the shared runner (checked by no_kv_block_left_referenced)."""

    def build(num_blocks: int | None = None, **overrides) -> EngineCore:
        settings = engine_settings.model_copy(update=overrides)
        wrapped = runner if num_blocks is None else SizedRunner(runner, num_blocks)
        return EngineCore(wrapped, tokenizer, settings)

    return build


def drive(
    core: EngineCore,
    arrivals: dict[int, Iterable[tuple[str, list[int]]]],
    params: SamplingParams = GREEDY,
    max_steps: int = 100_000,
) -> dict[str, list[int]]:
    """Add requests at the given step numbers and step until all finish; return token ids."""
    pending = {step: list(reqs) for step, reqs in arrivals.items()}
    tokens: dict[str, list[int]] = defaultdict(list)
    for step in range(max_steps):
        for request_id, prompt in pending.pop(step, []):
            assert core.add_request(request_id, prompt, params) == []
        if not pending and not core.has_unfinished():
            return dict(tokens)
        for delta in core.step():
            assert_ok(delta)
            tokens[delta.request_id].extend(delta.token_ids)
    raise AssertionError("the engine did not finish")


def assert_ok(delta: TokenDelta) -> None:
    assert delta.error is None, delta.error
