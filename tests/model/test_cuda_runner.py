"""The CUDA runner: decode CUDA graphs and batch invariance (run by `make gpu-check`;
skipped unless LAMINA_TEST_DEVICE=cuda)."""

from __future__ import annotations

import pytest

from app.config import load_settings
from app.core import SamplingParams
from app.engine.engine_core import EngineCore
from app.model.runner import ModelRunner
from tests.model.helpers import NaiveBlockAllocator, generate, make_sequence

pytestmark = pytest.mark.gpu
NUM_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def cuda_settings(default_model_path, device_case):
    if device_case.device.type != "cuda":
        pytest.skip("needs LAMINA_TEST_DEVICE=cuda")
    return load_settings(
        environ={},
        model=default_model_path,
        device="cuda",
        dtype=str(device_case.dtype).removeprefix("torch."),
        num_gpu_blocks_override=512,
        max_num_seqs=32,
    )


@pytest.fixture(scope="module")
def graph_runner(cuda_settings):
    runner = ModelRunner.from_settings(cuda_settings)
    assert runner.decode_graphs is not None  # cuda_graphs defaults to on
    runner.warmup()
    return runner


def test_graph_decoding_generates_like_eager_decoding(graph_runner, cuda_settings, prompts):
    eager = ModelRunner.from_settings(cuda_settings.model_copy(update={"cuda_graphs": False}))
    assert eager.decode_graphs is None
    outputs = []
    for runner in (graph_runner, eager):
        seqs = [make_sequence(p, max_tokens=NUM_NEW_TOKENS) for p in prompts]
        allocator = NaiveBlockAllocator(runner.num_blocks, runner.block_size)
        outputs.append(generate(runner, allocator, seqs, frozenset()))
    graphs, eager_tokens = outputs
    # Same kernels; only the padded key count differs, so greedy ids agree (bf16 near-ties
    # could in principle flip late: compare the first 16).
    assert [g[:16] for g in graphs] == [e[:16] for e in eager_tokens]
    assert graph_runner.decode_graphs.graphs, "no decode step went through a graph"


def _run(core: EngineCore, batch) -> dict[str, list[tuple[int, float]]]:
    for request_id, prompt, params in batch:
        assert core.add_request(request_id, prompt, params) == []
    out: dict[str, list[tuple[int, float]]] = {rid: [] for rid, _, _ in batch}
    while core.has_unfinished():
        for delta in core.step():
            assert delta.error is None, delta.error
            out[delta.request_id] += [(lp.token_id, lp.logprob) for lp in delta.logprobs]
    return out


@pytest.mark.xfail(
    reason="unverified: needs cuBLAS rows to be invariant in M (see docs/performance.md)",
    strict=False,
)
def test_batch_invariance_on_cuda(graph_runner, cuda_settings, tokenizer, prompts):
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, logprobs=0)
    seeded = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.9, seed=3, logprobs=0)
    batch = [(f"g{i}", p, params) for i, p in enumerate(prompts)]
    batch += [(f"s{i}", p, seeded) for i, p in enumerate(prompts)]
    alone = {}
    for request in batch:
        alone.update(_run(EngineCore(graph_runner, tokenizer, cuda_settings), [request]))
    together = _run(EngineCore(graph_runner, tokenizer, cuda_settings), batch)
    assert together == alone
