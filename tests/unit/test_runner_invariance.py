"""Batch invariance of the runner on the tiny model: every sampled token's logprob has
the same bits alone or in a crowd, whatever the chunking (fast twin of tests/perf)."""

from __future__ import annotations

import pytest
import torch

from app.config import Settings
from app.core import SamplingParams
from app.model.runner import ModelRunner
from tests.model.helpers import NaiveBlockAllocator, engine_step, make_sequence


def tiny_runner(path, **overrides) -> ModelRunner:
    fields = dict(model=path, device="cpu", block_size=4, kv_cache_gb=0.004)
    return ModelRunner.from_settings(Settings(**{**fields, **overrides}))


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (length,), generator=generator).tolist()


def run(runner, seqs, chunk_of) -> list[list[tuple[int, float]]]:
    """Step all sequences to max_tokens; chunk_of(seq, step) caps each prefill chunk."""
    allocator = NaiveBlockAllocator(runner.num_blocks, runner.block_size)
    results = [[] for _ in seqs]
    running = list(range(len(seqs)))
    step = 0
    while running:
        work = []
        for i in running:
            seq = seqs[i]
            left = seq.num_tokens - seq.num_computed_tokens
            work.append((seq, min(left, chunk_of(i, step))))
        outputs = engine_step(runner, allocator, work)
        for (seq, _), output in zip(work, outputs):
            if output is not None:
                results[seqs.index(seq)].append((output.token_id, output.logprob))
        running = [i for i in running if len(seqs[i].output_token_ids) < seqs[i].max_tokens]
        step += 1
    return results


PARAMS = [
    SamplingParams(temperature=0.0, logprobs=0, max_tokens=None),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, logprobs=0, max_tokens=None),
]


# (weight_dtype, native_kernels): lamina's compiled kernels by default, torch's (what a
# machine without a C compiler runs: padded rows and key buckets) as the fallback.
KERNEL_SETUPS = [
    ("auto", True),
    ("auto", False),
    ("float16", True),
    ("bfloat16", True),
    ("int8", True),  # rows quantized per block of 32 in every matmul: still per row
    ("int4", True),
]


@pytest.mark.parametrize("weight_dtype, native_kernels", KERNEL_SETUPS)
def test_logprob_bits_do_not_depend_on_the_batch(tiny_model_path, weight_dtype, native_kernels):
    runner = tiny_runner(tiny_model_path, weight_dtype=weight_dtype, native_kernels=native_kernels)
    # Native matmuls (fp32, fp16 or bf16 weights) run the layers as one call
    # (fused_layers.py): that path too.
    fused = runner.model.native is not None
    assert runner.model.fuse_layers == fused
    lengths = [3, 17, 40, 9, 70, 1]

    def sequences():
        return [
            make_sequence(prompt(n, n), PARAMS[i % 2], max_tokens=8) for i, n in enumerate(lengths)
        ]

    alone = [run(runner, [seq], lambda i, step: 10**9)[0] for seq in sequences()]
    chunk_sizes = [5, 1, 13, 32, 2]
    together = run(runner, sequences(), lambda i, step: chunk_sizes[(i + step) % 5])
    assert together == alone


def run_with_preemption(runner, seqs, preempt_after, chunk) -> list[list[tuple[int, float]]]:
    """Like run() in chunks of `chunk`, but sequence i is preempted once when it has
    preempt_after[i] outputs: its blocks are freed and prompt plus outputs recomputed."""
    allocator = NaiveBlockAllocator(runner.num_blocks, runner.block_size)
    results = [[] for _ in seqs]
    pending = dict(preempt_after)
    running = list(range(len(seqs)))
    while running:
        for i in running:
            seq = seqs[i]
            if pending.get(i) == len(seq.output_token_ids):
                del pending[i]
                allocator.release(seq.block_table)  # as the scheduler preempts by recompute
                seq.num_computed_tokens = 0
        work = [
            (seqs[i], min(chunk, seqs[i].num_tokens - seqs[i].num_computed_tokens)) for i in running
        ]
        outputs = engine_step(runner, allocator, work)
        for (seq, _), output in zip(work, outputs):
            if output is not None:
                results[seqs.index(seq)].append((output.token_id, output.logprob))
        running = [i for i in running if len(seqs[i].output_token_ids) < seqs[i].max_tokens]
    return results


@pytest.mark.parametrize("weight_dtype, native_kernels", KERNEL_SETUPS)
def test_logprob_bits_survive_preemption_and_recompute(
    tiny_model_path, weight_dtype, native_kernels
):
    """A recompute chunk holds prompt and generated tokens; with fp16 weights the generated
    ones must go through the fp16 kernel again, or their keys and values would change."""
    runner = tiny_runner(tiny_model_path, weight_dtype=weight_dtype, native_kernels=native_kernels)
    lengths = [11, 23, 6]

    def sequences():
        return [
            make_sequence(prompt(n, n), PARAMS[i % 2], max_tokens=10) for i, n in enumerate(lengths)
        ]

    alone = [run(runner, [seq], lambda i, step: 10**9)[0] for seq in sequences()]
    for chunk in (7, 64):  # chunks across the prompt/output boundary, and whole recomputes
        preempted = run_with_preemption(runner, sequences(), {0: 3, 1: 6, 2: 1}, chunk)
        assert preempted == alone, chunk


def test_the_runner_uses_native_attention_when_the_kernels_build(tiny_model_path, native):
    assert tiny_runner(tiny_model_path).attention_backend == "native"
    assert tiny_runner(tiny_model_path, native_kernels=False).attention_backend == "bmm"


def test_fp16_weights_split_rows_by_token_kind(tiny_model_path):
    assert tiny_runner(tiny_model_path, weight_dtype="float16").splits_rows
    assert not tiny_runner(tiny_model_path).splits_rows
    assert not tiny_runner(tiny_model_path, weight_dtype="bfloat16").splits_rows


def test_fp16_weights_compute_prompts_as_fp32_does(tiny_model_path):
    """The first token samples from the last prompt token's row: fp32 kernels, so the same
    bits as the fp32 runner whatever the chunking; later tokens read the fp16 weights."""
    fp32 = tiny_runner(tiny_model_path)
    fp16 = tiny_runner(tiny_model_path, weight_dtype="float16")
    for i, n in enumerate([5, 33, 70]):
        params = PARAMS[i % 2]
        expected = run(fp32, [make_sequence(prompt(n, n), params, max_tokens=3)], lambda *_: 10**9)
        for chunk in (10**9, 8):
            got = run(
                fp16,
                [make_sequence(prompt(n, n), params, max_tokens=3)],
                lambda *_, chunk=chunk: chunk,
            )
            assert got[0][0] == expected[0][0]
            assert got[0][1:] != expected[0][1:]  # generated rows: the fp16 kernel


def test_fp16_prefix_cache_does_not_serve_generated_kv_to_a_prompt(tiny_model_path):
    """A follow-up prompt that repeats an earlier answer (a chat's next turn) must get the
    same bits as on an engine that never saw the answer: the cached blocks holding the
    answer's fp16-computed K/V are not reused for its fp32 prompt rows."""
    from app.engine.engine_core import EngineCore
    from app.tokenizer import Tokenizer

    runner = tiny_runner(tiny_model_path, weight_dtype="float16")
    tokenizer = Tokenizer(tiny_model_path)
    settings = Settings(model=tiny_model_path, device="cpu", block_size=4, kv_cache_gb=0.004)
    greedy = SamplingParams(temperature=0.0, logprobs=0, max_tokens=12, ignore_eos=True)

    def complete(core, request_id, prompt_ids):
        assert core.add_request(request_id, prompt_ids, greedy) == []
        tokens, logprobs = [], []
        while core.has_unfinished():
            for delta in core.step():
                assert delta.error is None, delta.error
                tokens += delta.token_ids
                logprobs += [entry.logprob for entry in delta.logprobs]
        return tokens, logprobs

    first_prompt = prompt(10, 1)
    warm = EngineCore(runner, tokenizer, settings)
    answer, _ = complete(warm, "first", first_prompt)
    follow_up = first_prompt + answer + prompt(6, 2)
    assert warm.block_manager.hash_token_kinds
    after_answer = complete(warm, "follow-up", follow_up)
    assert warm.block_manager.prefix_cache_hits > 0  # the prompt-only block was reused
    fresh = complete(EngineCore(runner, tokenizer, settings), "follow-up", follow_up)
    assert after_answer == fresh
