"""Batch invariance at engine level: a greedy or seeded request returns the same token
ids whether it runs alone or among 19 others (different prompts, lengths, sampling).

Alone, a prompt is prefilled in one chunk; together, the 512-token budget cuts prompts
at other places, prefix caching serves the shared chat-template prefix from blocks
another request computed, and every decode step batches up to 20 sequences with
different context lengths. `Settings.batch_invariant` (default on) must make all of
that invisible in the output.

The model is the default one cut to its first layers (`shallow_default_model_path`):
the same kernels, shapes, vocabulary and real weights, a fifth of the time. Invariance
holds layer by layer, so depth adds no coverage; the full model's outputs are checked
through HTTP by tests/api/test_batch_invariance_http.py.
"""

from __future__ import annotations

import pytest
import torch

from app.bench.corpus import PASSAGE
from app.core import SamplingParams
from app.engine.engine_core import EngineCore
from tests.engine.conftest import assert_ok
from tests.perf.conftest import default_settings

pytestmark = pytest.mark.slow
NUM_NEW_TOKENS = 24

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers greater than 50.",
    "Who wrote Pride and Prejudice?",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "Give me a short tip for learning to cook.",
]


def build_prompts(tokenizer) -> list[list[int]]:
    """16 greedy prompts: chat prompts sharing the template's prefix, and plain text
    slices of 5 to ~300 tokens; then 4 more for seeded sampling."""
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    corpus = tokenizer.encode(PASSAGE)
    slices = [(0, 5), (40, 33), (90, 64), (150, 121), (210, 200), (5, 287), (60, 17), (7, 150)]
    texts = [corpus[start : start + length] for start, length in slices]
    extra = [
        tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}]),
        corpus[300:390],
        corpus[11:260],
        tokenizer.encode("Once upon a time"),
    ]
    return chats + texts + extra


def requests(tokenizer) -> list[tuple[str, list[int], SamplingParams]]:
    """Greedy and seeded requests; each asks for the chosen token's logprob, whose float
    bits expose any numerical difference long before a token flips."""
    prompts = build_prompts(tokenizer)
    common = dict(max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=0)
    greedy = SamplingParams(temperature=0.0, **common)
    out = [(f"greedy-{i}", p, greedy) for i, p in enumerate(prompts[:16])]
    for i, prompt in enumerate(prompts[16:]):
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, **common)
        out.append((f"seeded-{i}", prompt, params))
    return out


def run(core: EngineCore, batch) -> dict[str, list[tuple[int, float]]]:
    """Submit every request at once, step to the end: (token id, logprob) per request."""
    for request_id, prompt, params in batch:
        assert core.add_request(request_id, prompt, params) == []
    outputs: dict[str, list[tuple[int, float]]] = {rid: [] for rid, _, _ in batch}
    while core.has_unfinished():
        for delta in core.step():
            assert_ok(delta)
            outputs[delta.request_id] += [(lp.token_id, lp.logprob) for lp in delta.logprobs]
    return outputs


@pytest.fixture(scope="module")
def runner(shallow_default_model_path):
    from app.model.runner import ModelRunner

    return ModelRunner.from_settings(default_settings(shallow_default_model_path))


def test_alone_and_together_give_identical_tokens(
    runner, perf_tokenizer, shallow_default_model_path
):
    settings = default_settings(shallow_default_model_path)
    assert settings.batch_invariant  # the default
    check_alone_and_together(runner, perf_tokenizer, settings)


def test_fp16_weights_alone_and_together_give_identical_tokens(
    perf_tokenizer, shallow_default_model_path
):
    """fp16 weights: prompt tokens through fp32 kernels, generated ones through fp16, chosen
    per token; prefix-cache hits on the shared chat prefix must not change that."""
    from app.model.runner import ModelRunner

    settings = default_settings(shallow_default_model_path, weight_dtype="float16")
    fp16_runner = ModelRunner.from_settings(settings)
    assert fp16_runner.splits_rows
    check_alone_and_together(fp16_runner, perf_tokenizer, settings)


def test_bf16_weights_alone_and_together_give_identical_tokens(
    native, perf_tokenizer, shallow_default_model_path
):
    """bf16 weights: one bf16 copy for every row, in lamina's native kernels (the fused
    decoder stack and the head), whose rows never depend on the row count, unlike
    oneDNN's bf16 matmul on AMX CPUs."""
    from app.model.linear import NativeLinearKernel
    from app.model.runner import ModelRunner

    settings = default_settings(shallow_default_model_path, weight_dtype="bfloat16")
    bf16_runner = ModelRunner.from_settings(settings)
    model = bf16_runner.model
    assert model.native is native and model.fuse_layers and not bf16_runner.splits_rows
    assert isinstance(model.lm_head.kernel, NativeLinearKernel)
    assert model.lm_head.kernel.panels.dtype == torch.bfloat16
    # Every other request (chats, text slices, two seeded): half the time of the others.
    check_alone_and_together(bf16_runner, perf_tokenizer, settings, every=2)


def check_alone_and_together(runner, perf_tokenizer, settings, every: int = 1) -> None:
    batch = requests(perf_tokenizer)[::every]
    alone = {}
    for request in batch:
        core = EngineCore(runner, perf_tokenizer, settings)  # fresh prefix cache each time
        alone.update(run(core, [request]))
    together = run(EngineCore(runner, perf_tokenizer, settings), batch)
    assert set(together) == set(alone)
    changed = [rid for rid in alone if alone[rid] != together[rid]]
    assert not changed, (
        f"{len(changed)} of {len(alone)} requests changed tokens or logprobs: {changed}"
    )
    assert all(len(t) == NUM_NEW_TOKENS for t in together.values())
