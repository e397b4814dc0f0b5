"""Each native family's greedy generations equal transformers' `generate`, token for
token (fp32, CPU): one request at a time, all together, with prefix caching, with
chunked prefill and under preemption, through the fused native decoder stack and
through the native kernels one op at a time. The Mistral model with a 12-token window
generates far past it."""

from __future__ import annotations

import pytest
import torch

from app.config import load_settings
from app.core import SamplingParams
from app.engine.engine_core import EngineCore
from app.tokenizer import Tokenizer
from tests.engine.conftest import SizedRunner, drive, hf_greedy
from tests.families.conftest import ENGINE_FAMILIES, UNFUSED_FAMILIES

NUM_NEW_TOKENS = 8
# Prefixes of one text, each 2 tokens short of a block boundary its new tokens cross.
PROMPT_LENGTHS = (14, 30, 46)


class FamilyCase:
    """One family's model: a runner over it, its prompts and transformers' answers."""

    def __init__(self, path) -> None:
        from transformers import AutoModelForCausalLM

        from app.model.runner import ModelRunner

        self.settings = load_settings(
            environ={}, model=path, kv_cache_gb=0.05, device="cpu", dtype="float32"
        )
        self.runner = ModelRunner.from_settings(self.settings)
        self.tokenizer = Tokenizer(path)
        generator = torch.Generator().manual_seed(11)
        vocab = self.runner.config.vocab_size
        longest = torch.randint(3, vocab, (max(PROMPT_LENGTHS),), generator=generator).tolist()
        other = torch.randint(3, vocab, (20,), generator=generator).tolist()
        # Prefixes of one text, then one that parts from it after 32 tokens (52 in all).
        self.prompts = [longest[:n] for n in PROMPT_LENGTHS] + [longest[:32] + other]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.expected = [hf_greedy(hf, p, NUM_NEW_TOKENS) for p in self.prompts]

    def core(self, fused: bool, num_blocks: int | None = None, **overrides) -> EngineCore:
        if self.runner.model.native is not None:
            assert self.runner.model.fuse_layers or not fused, "the layers must fuse"
        self.runner.model.fuse_layers = fused and self.runner.model.native is not None
        settings = self.settings.model_copy(update=overrides)
        runner = self.runner if num_blocks is None else SizedRunner(self.runner, num_blocks)
        return EngineCore(runner, self.tokenizer, settings)


@pytest.fixture(scope="module")
def loaded_cases() -> dict[str, FamilyCase]:
    return {}  # filled on first use: one runner and one set of references per family


# (family, through the fused stack): every family one op at a time, and fused where the
# stack runs it.
RUNS = [
    (family, fused)
    for family in ENGINE_FAMILIES
    for fused in (True, False)
    if not (fused and family in UNFUSED_FAMILIES)
]


@pytest.fixture(params=RUNS, ids=[f"{f}-{'fused' if x else 'per_op'}" for f, x in RUNS])
def run(request, family_model_paths, loaded_cases) -> tuple[FamilyCase, bool]:
    """A family's case and whether this test runs it through the fused stack."""
    name, fused = request.param
    if name not in loaded_cases:
        loaded_cases[name] = FamilyCase(family_model_paths[name])
    runner = loaded_cases[name].runner
    as_loaded = runner.model.native is not None and runner.model.fuse_layers
    yield loaded_cases[name], fused
    runner.model.fuse_layers = as_loaded  # for the next test


PARAMS = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0)


def _run(core: EngineCore, arrivals) -> dict[str, list[int]]:
    return drive(core, arrivals, PARAMS)


def _ids(case: FamilyCase) -> list[str]:
    return [f"r{i}" for i in range(len(case.prompts))]


def test_one_at_a_time(run):
    case, fused = run
    core = case.core(fused)
    for request_id, prompt, expected in zip(_ids(case), case.prompts, case.expected):
        assert _run(core, {0: [(request_id, prompt)]})[request_id] == expected, request_id


def test_batched_and_staggered(run):
    case, fused = run
    core = case.core(fused, enable_prefix_caching=False)
    arrivals = {2 * i: [(rid, p)] for i, (rid, p) in enumerate(zip(_ids(case), case.prompts))}
    got = _run(core, arrivals)
    assert [got[rid] for rid in _ids(case)] == case.expected


def test_prefix_caching(run):
    case, fused = run
    core = case.core(fused)
    longest = len(PROMPT_LENGTHS) - 1
    assert _run(core, {0: [("first", case.prompts[longest])]})["first"] == case.expected[longest]
    hits = core.block_manager.prefix_cache_hits
    got = _run(core, {0: list(zip(_ids(case), case.prompts))})
    assert core.block_manager.prefix_cache_hits - hits >= 16 * 4, "the prefix cache was unused"
    assert [got[rid] for rid in _ids(case)] == case.expected


def test_chunked_prefill(run):
    case, fused = run
    core = case.core(fused, max_num_batched_tokens=16, enable_prefix_caching=False)
    got = _run(core, {0: list(zip(_ids(case), case.prompts))})
    assert [got[rid] for rid in _ids(case)] == case.expected


def test_preemption(run):
    case, fused = run
    # The first three take the 6 blocks (1 + 2 + 3 of 16) and each needs one more after
    # 2 new tokens: someone must be preempted.
    core = case.core(fused, num_blocks=6, enable_prefix_caching=False)
    got = _run(core, {0: list(zip(_ids(case), case.prompts))})
    assert core.scheduler.num_preemptions > 0, "the test did not force preemption"
    assert [got[rid] for rid in _ids(case)] == case.expected
