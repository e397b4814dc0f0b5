"""ModelRunner on the tiny random LLaMA: settings, batch contract, generation vs transformers."""

from __future__ import annotations

import copy

import pytest
import torch

from app.config import Settings
from app.core import SamplingParams, ScheduledBatch, ScheduledSeq
from app.model.kv_cache import GIB, bytes_per_block
from app.model.runner import ModelRunner, resolve_device, resolve_dtype
from tests.model.helpers import NaiveBlockAllocator, engine_step, generate, hf_greedy, make_sequence

EOS = frozenset({2})
KV_CACHE_GB = 0.002


def tiny_settings(path, **overrides) -> Settings:
    fields = dict(model=path, device="cpu", block_size=4, kv_cache_gb=KV_CACHE_GB)
    return Settings(**{**fields, **overrides})


@pytest.fixture(scope="module")
def runner(tiny_model_path) -> ModelRunner:
    return ModelRunner.from_settings(tiny_settings(tiny_model_path))


@pytest.fixture
def allocator(runner) -> NaiveBlockAllocator:
    return NaiveBlockAllocator(runner.num_blocks, runner.block_size)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(
        3, 49152, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def test_from_settings(runner, tiny_model_path):
    config = runner.config
    assert runner.device == torch.device("cpu") and runner.dtype == torch.float32
    assert runner.block_size == 4
    per_block = bytes_per_block(config, 4, torch.float32)
    assert runner.num_blocks == int(KV_CACHE_GB * GIB // per_block)
    assert runner.max_model_len == 1024  # the model's max_position_embeddings
    other = ModelRunner.from_settings(
        tiny_settings(tiny_model_path, max_model_len=64, dtype="bfloat16")
    )
    assert other.max_model_len == 64 and other.dtype == torch.bfloat16
    assert other.kv_cache.layer(0).dtype == torch.bfloat16


def test_device_and_dtype_resolution():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_greedy_generation_matches_transformers(runner, allocator, tiny_model_path):
    prompts = [prompt(n, seed) for seed, n in enumerate((5, 13, 30))]
    expected = hf_greedy(tiny_model_path, prompts, max_new_tokens=12)
    seqs = [make_sequence(p, max_tokens=12) for p in prompts]
    assert generate(runner, allocator, seqs, EOS, max_chunk_tokens=6) == expected


def test_results_follow_batch_order(runner, allocator):
    """Prefills before decodes in the batch (the runner reorders internally), and a chunk
    that does not reach its last token gets None."""
    partial, decoding, fresh = (make_sequence(prompt(n, n)) for n in (20, 9, 7))
    engine_step(runner, allocator, [(decoding, 9)])
    outputs = engine_step(runner, allocator, [(partial, 8), (fresh, 7), (decoding, 1)])
    assert outputs[0] is None
    assert outputs[1] is not None and outputs[2] is not None
    # Each sequence alone, from scratch, gives the same tokens.
    for seq in (fresh, decoding):
        alone = make_sequence(seq.prompt_token_ids)
        generate(runner, allocator, [alone], EOS)
        assert alone.output_token_ids[: len(seq.output_token_ids)] == seq.output_token_ids


def test_runner_never_mutates_sequences(runner, allocator):
    seqs = [make_sequence(prompt(6, 1)), make_sequence(prompt(3, 2))]
    for seq in seqs:
        allocator.reserve(seq.block_table, seq.num_tokens)
    before = copy.deepcopy(seqs)
    runner.execute(ScheduledBatch([ScheduledSeq(s, s.num_tokens, True) for s in seqs], 9))
    for seq, old in zip(seqs, before):
        assert vars(seq) == vars(old)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda item: item.seq.block_table.pop(), "block table has"),
        (lambda item: setattr(item, "num_new_tokens", 0), "must be >= 1"),
        (lambda item: setattr(item, "num_new_tokens", 99), "scheduled up to"),
        (lambda item: item.seq.block_table.__setitem__(0, 10**6), "block id outside"),
        (lambda item: setattr(item, "num_new_tokens", 4), "samples before its last"),
    ],
    ids=["short table", "no tokens", "past the end", "bad block id", "early sample"],
)
def test_broken_batches_raise(runner, allocator, breakage, message):
    seq = make_sequence(prompt(6, 3))
    allocator.reserve(seq.block_table, seq.num_tokens)
    item = ScheduledSeq(seq, 6, sample=True)
    breakage(item)
    with pytest.raises(ValueError, match=message):
        runner.execute(ScheduledBatch([item], item.num_new_tokens))


def test_longer_than_max_model_len_raises(tiny_model_path):
    small = ModelRunner.from_settings(tiny_settings(tiny_model_path, max_model_len=16))
    seq = make_sequence(prompt(17, 4))
    NaiveBlockAllocator(small.num_blocks, 4).reserve(seq.block_table, 17)
    with pytest.raises(ValueError, match="max_model_len"):
        small.execute(ScheduledBatch([ScheduledSeq(seq, 17, True)], 17))


def test_empty_batch(runner):
    assert runner.execute(ScheduledBatch([], 0)) == []


def test_seeded_sampling_does_not_depend_on_the_batch(runner, allocator):
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=None)
    alone = make_sequence(prompt(8, 5), params, max_tokens=6)
    generate(runner, allocator, [alone], frozenset())
    crowd = [
        make_sequence(prompt(5 + i, 10 + i), SamplingParams(temperature=1.0)) for i in range(3)
    ]
    again = make_sequence(prompt(8, 5), params, max_tokens=6)
    generate(runner, allocator, [*crowd[:2], again, crowd[2]], frozenset(), max_chunk_tokens=3)
    assert again.output_token_ids == alone.output_token_ids


def test_warmup_then_generation_still_exact(runner, allocator):
    seq = make_sequence(prompt(10, 6), max_tokens=4)
    generate(runner, allocator, [seq], EOS)
    runner.warmup()
    again = make_sequence(prompt(10, 6), max_tokens=4)
    generate(runner, allocator, [again], EOS)
    assert again.output_token_ids == seq.output_token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runner_generates_like_the_cpu_runner(tiny_model_path, runner):
    cuda = ModelRunner.from_settings(
        tiny_settings(tiny_model_path, device="cuda", dtype="float32", num_gpu_blocks_override=64)
    )
    assert cuda.device.type == "cuda" and cuda.num_blocks == 64
    cuda.warmup()
    prompts = [prompt(n, n) for n in (5, 17)]
    on_cpu = [make_sequence(p, max_tokens=8) for p in prompts]
    on_gpu = [make_sequence(p, max_tokens=8) for p in prompts]
    generate(runner, NaiveBlockAllocator(runner.num_blocks, 4), on_cpu, EOS)
    generate(cuda, NaiveBlockAllocator(cuda.num_blocks, 4), on_gpu, EOS, max_chunk_tokens=4)
    assert [s.output_token_ids for s in on_gpu] == [s.output_token_ids for s in on_cpu]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_is_sized_from_free_memory(tiny_model_path):
    cuda = ModelRunner.from_settings(
        tiny_settings(tiny_model_path, device="cuda", gpu_memory_utilization=0.05)
    )
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    assert cuda.dtype == torch.bfloat16
    assert 0 < cuda.kv_cache.num_bytes <= 0.05 * total_bytes
