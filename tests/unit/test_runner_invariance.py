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


@pytest.mark.parametrize("weight_dtype", ["auto", "float16", "bfloat16"])
def test_logprob_bits_do_not_depend_on_the_batch(tiny_model_path, weight_dtype):
    runner = tiny_runner(tiny_model_path, weight_dtype=weight_dtype)
    lengths = [3, 17, 40, 9, 70, 1]

    def sequences():
        return [
            make_sequence(prompt(n, n), PARAMS[i % 2], max_tokens=8) for i, n in enumerate(lengths)
        ]

    alone = [run(runner, [seq], lambda i, step: 10**9)[0] for seq in sequences()]
    chunk_sizes = [5, 1, 13, 32, 2]
    together = run(runner, sequences(), lambda i, step: chunk_sizes[(i + step) % 5])
    assert together == alone
