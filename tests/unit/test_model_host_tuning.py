"""CPU thread count and host memory settings for the model runner."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from app.model import cpu_threads, host_memory
from app.model.config import ModelConfig
from app.model.kv_cache import KVCache


def test_thread_count_is_physical_cores_within_affinity_and_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_threads, "_allowed_cpus", lambda: {0, 1, 2, 3})
    # Two cores with two SMT siblings each.
    monkeypatch.setattr(cpu_threads, "_physical_cores", lambda cpus: len(cpus) // 2)
    monkeypatch.setattr(cpu_threads, "_cgroup_cpu_quota", lambda: None)
    assert cpu_threads.default_num_threads() == 2
    monkeypatch.setattr(cpu_threads, "_cgroup_cpu_quota", lambda: 1.5)  # 150% of a CPU
    assert cpu_threads.default_num_threads() == 2
    monkeypatch.setattr(cpu_threads, "_cgroup_cpu_quota", lambda: 0.5)
    assert cpu_threads.default_num_threads() == 1


def test_cgroup_v2_quota_is_read(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu_threads, "_CGROUP_V2_CPU_MAX", cpu_max)
    cpu_max.write_text("300000 100000\n")
    assert cpu_threads._cgroup_cpu_quota() == 3.0
    cpu_max.write_text("max 100000\n")
    assert cpu_threads._cgroup_cpu_quota() is None


def test_this_machine_gets_at_least_one_thread():
    assert 1 <= cpu_threads.default_num_threads() <= (os.cpu_count() or 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and madvise")
def test_memory_advice_is_harmless():
    host_memory.keep_freed_memory_in_heap()  # may be refused (musl): must not raise
    big = torch.empty(8 << 20)  # 32 MiB: holds whole 2 MiB pages
    host_memory.advise_huge_pages(big)
    big.fill_(1.0)
    assert big.sum().item() == big.numel()
    assert host_memory.advise_huge_pages(torch.empty(16)) is False  # no whole huge page


def test_huge_page_arena_hands_out_separate_aligned_tensors():
    arena = host_memory.HugePageArena(chunk_bytes=4 << 20)
    a = arena.empty((3, 5))
    b = arena.empty((1000, 64))
    big = arena.empty((2, 1 << 20))  # 8 MiB: more than a chunk, gets a chunk of its own
    for tensor, shape in ((a, (3, 5)), (b, (1000, 64)), (big, (2, 1 << 20))):
        assert tensor.shape == shape and tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert tensor.data_ptr() % 64 == 0
    assert big.data_ptr() % (2 << 20) == 0  # chunks start on a huge page boundary
    a.fill_(1.0)
    b.fill_(2.0)
    big.fill_(3.0)
    assert a.eq(1.0).all() and b.eq(2.0).all() and big.eq(3.0).all()  # no overlap
    assert b.data_ptr() >= a.data_ptr() + a.numel() * 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and /proc")
def test_lazy_zeros_cost_memory_only_where_written():
    pages = host_memory.lazy_zeros((64, 1024, 64), torch.float32)  # 16 MiB: 64 x 256 KiB
    assert pages.shape == (64, 1024, 64) and pages.is_contiguous()
    assert host_memory.resident_bytes(pages) == 0  # reserved, nothing backed yet
    pages[5].fill_(1.0)
    pages[40, 3, 7] = 2.0
    resident = host_memory.resident_bytes(pages)
    assert 256 << 10 < resident <= (256 << 10) + 2 * 4096  # one slice and one page
    assert pages.sum().item() == 1024 * 64 + 2.0  # the rest reads as zeros
    rss = host_memory.process_rss_bytes()
    assert rss is not None and rss > resident


def test_kv_cache_costs_memory_as_blocks_are_written():
    config = ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    cache = KVCache(config, 512, 16, torch.device("cpu"), torch.float32)
    if cache.num_resident_bytes is None:
        pytest.skip("the kernel cannot say which pages are resident here")
    assert cache.num_resident_bytes == 0  # reserved only
    # A block of one layer's head is 16 tokens x head_dim 16 x 4 bytes = 1 KiB: the
    # first 256 of 512 blocks are the first half of each of the 16 (layer, k/v, head).
    for layer in range(4):
        cache.layer(layer)[:, :, :256] = 1.0
    half = cache.num_bytes // 2
    assert half <= cache.num_resident_bytes <= half + 16 * 4096
    assert cache.layer(3)[:, :, 256:].abs().sum().item() == 0.0  # the rest reads as zeros
