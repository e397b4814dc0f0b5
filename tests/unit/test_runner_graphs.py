"""Decode steps through DecodeGraphs (its eager twin on the CPU): padding to batch and key
buckets, the scratch block, and the static buffers give transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch

from app.config import Settings
from app.model.cuda_graphs import batch_bucket, graph_num_keys
from app.model.runner import ModelRunner
from tests.model.helpers import NaiveBlockAllocator, generate, hf_greedy, make_sequence

EOS = frozenset({2})


def test_buckets():
    assert [batch_bucket(n) for n in (1, 3, 5, 17, 33, 200)] == [1, 4, 8, 24, 48, 256]
    assert graph_num_keys(1, 16, 8192) == 256
    assert graph_num_keys(257, 16, 8192) == 512
    assert graph_num_keys(2049, 16, 8192) == 4096
    assert graph_num_keys(5000, 16, 6000) == 6000  # capped at the context window
    assert graph_num_keys(100, 48, 8192) % 48 == 0  # whole blocks


@pytest.fixture(scope="module")
def graph_runner(tiny_model_path) -> ModelRunner:
    settings = Settings(model=tiny_model_path, device="cpu", block_size=4, kv_cache_gb=0.004)
    runner = ModelRunner.from_settings(settings)
    runner.enable_decode_graphs(max_batch=8, use_cuda_graphs=False)
    return runner


def test_decode_steps_through_graphs_match_transformers(graph_runner, tiny_model_path):
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (5, 30, 12)]
    expected = hf_greedy(tiny_model_path, prompts, max_new_tokens=10)
    lengths = (10, 6, 3)  # the batch shrinks: 3 (padded to 4), then 2, then 1
    seqs = [make_sequence(p, max_tokens=n) for p, n in zip(prompts, lengths)]
    allocator = NaiveBlockAllocator(graph_runner.num_blocks, graph_runner.block_size)
    got = generate(graph_runner, allocator, seqs, EOS)
    assert got == [e[:n] for e, n in zip(expected, lengths)]
    assert {(4, 256), (2, 256), (1, 256)} <= set(graph_runner.decode_graphs.graphs)


def test_steps_with_prefill_chunks_skip_the_graphs(graph_runner):
    seq = make_sequence(list(range(3, 20)), max_tokens=2)
    allocator = NaiveBlockAllocator(graph_runner.num_blocks, graph_runner.block_size)
    graph_runner.decode_graphs.graphs.clear()
    generate(graph_runner, allocator, [seq], EOS, max_chunk_tokens=5)
    assert set(graph_runner.decode_graphs.graphs) == {(1, 256)}  # only the decode step
