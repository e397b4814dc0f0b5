"""The headline of speculative decoding in lamina: a verify step computes the same logits,
bit for bit, as one-token decode steps, alone and inside a batch of other requests, so
keeping the samples that confirm a draft changes no token (tiny random model).

With lamina's row-invariant kernels a row's result does not depend on how many rows
share its matmuls, and attention computes each query over exactly its own keys: the
draft rows see the same keys as the decode steps they stand for.
"""

from __future__ import annotations

import pytest
import torch

from app.core import SampleOutput, SamplingParams, ScheduledBatch, ScheduledSeq, Sequence
from tests.model.helpers import NaiveBlockAllocator, engine_step, make_sequence
from tests.unit.test_runner_invariance import KERNEL_SETUPS, prompt, tiny_runner

NUM_DRAFTS = 5
GREEDY = SamplingParams(temperature=0.0, logprobs=2, max_tokens=None)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, logprobs=2, max_tokens=None)


class RecordingSampler:
    """Wraps the runner's sampler and keeps every step's logits with their requests."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, list]] = []

    def __call__(self, logits, requests, token_bitmask=None):  # noqa: ANN001, ANN204
        self.calls.append((logits.float().clone(), list(requests)))
        return self.inner(logits, requests, token_bitmask)

    def rows_of(self, seq: Sequence) -> torch.Tensor:
        """Every logits row sampled for seq so far, in order: [R, vocab]."""
        rows = [
            logits[i]
            for logits, requests in self.calls
            for i, request in enumerate(requests)
            if request.prompt_token_ids is seq.prompt_token_ids
        ]
        return torch.stack(rows)


@pytest.fixture(scope="module", params=KERNEL_SETUPS, ids=lambda s: f"{s[0]}-native{s[1]}")
def runner(request, tiny_model_path):
    weight_dtype, native_kernels = request.param
    built = tiny_runner(tiny_model_path, weight_dtype=weight_dtype, native_kernels=native_kernels)
    built.sampler = RecordingSampler(built.sampler)
    return built


def decode_plainly(runner, prompt_ids, params) -> tuple[list[SampleOutput], torch.Tensor]:
    """Prefill, then NUM_DRAFTS + 1 one-token steps: their samples and logits rows."""
    allocator = NaiveBlockAllocator(runner.num_blocks, runner.block_size)
    seq = make_sequence(prompt_ids, params, max_tokens=100)
    (first,) = engine_step(runner, allocator, [(seq, len(prompt_ids))])
    samples = [first]
    for _ in range(NUM_DRAFTS + 1):
        samples += engine_step(runner, allocator, [(seq, 1)])
    logits = runner.sampler.rows_of(seq)[1:]  # [NUM_DRAFTS + 1, vocab], the decode steps
    allocator.release(seq.block_table)
    return samples, logits


def fields(sample: SampleOutput) -> tuple:
    return sample.token_id, sample.logprob, sample.top_logprobs


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def verify_step(runner, prompt_ids, params, drafts, crowd: bool):
    """Prefill, then one step computing the first sample and `drafts` after it, alone or
    among sequences that decode, end a prompt, and compute a first prompt chunk."""
    allocator = NaiveBlockAllocator(runner.num_blocks, runner.block_size)
    seq = make_sequence(prompt_ids, params, max_tokens=100)
    engine_step(runner, allocator, [(seq, len(prompt_ids))])
    others: list[tuple[Sequence, int]] = []
    if crowd:
        decoding = make_sequence(prompt(30, 1), SEEDED)
        ending = make_sequence(prompt(40, 2), GREEDY)
        starting = make_sequence(prompt(50, 3), GREEDY)
        engine_step(runner, allocator, [(decoding, 30), (ending, 20)])
        others = [(decoding, 1), (starting, 13), (ending, 20)]
    scheduled = []
    for other, num_new in others:
        allocator.reserve(other.block_table, other.num_computed_tokens + num_new)
        end = other.num_computed_tokens + num_new
        scheduled.append(ScheduledSeq(other, num_new, sample=end == other.num_tokens))
    allocator.reserve(seq.block_table, seq.num_tokens + len(drafts))
    position = min(1, len(scheduled))  # among the others, not first
    scheduled.insert(position, ScheduledSeq(seq, 1 + len(drafts), True, tuple(drafts)))
    num_tokens = sum(s.num_new_tokens for s in scheduled)
    outputs = runner.execute(ScheduledBatch(scheduled, num_tokens))
    logits = runner.sampler.rows_of(seq)[1:]  # [1 + len(drafts), vocab]
    for item in scheduled:
        allocator.release(item.seq.block_table)
    return outputs[position], logits


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("crowd", [False, True], ids=["alone", "in-a-batch"])
def test_verify_rows_have_the_bits_of_decode_steps(runner, params, crowd):
    prompt_ids = prompt(23, 5)
    plain, plain_logits = decode_plainly(runner, prompt_ids, params)
    drafts = [sample.token_id for sample in plain[1 : NUM_DRAFTS + 1]]  # all right
    output, logits = verify_step(runner, prompt_ids, params, drafts, crowd)
    assert torch.equal(bits(logits), bits(plain_logits))
    # Every sample (token, logprob and top logprobs; seeded draws included) is the
    # decode step's own.
    assert [fields(s) for s in (output, *output.after_drafts)] == [fields(s) for s in plain[1:]]


def test_rows_up_to_a_wrong_draft_keep_their_bits(runner):
    prompt_ids = prompt(23, 5)
    plain, plain_logits = decode_plainly(runner, prompt_ids, GREEDY)
    drafts = [sample.token_id for sample in plain[1 : NUM_DRAFTS + 1]]
    drafts[2] = (drafts[2] + 1) % 49152  # wrong from the third draft token on
    output, logits = verify_step(runner, prompt_ids, GREEDY, drafts, crowd=True)
    assert torch.equal(bits(logits[:3]), bits(plain_logits[:3]))
    assert output.after_drafts[1].token_id == plain[3].token_id  # the model's own, kept
