"""On a GPU the KV cache takes what the memory budget leaves; with a draft model the two
caches (as many blocks each) share that budget block for block. Without a GPU here,
the measured budget is replaced by a figure: the split is what is tested. On the CPU,
LAMINA_KV_CACHE_GB stays the served model's cache alone."""

from types import SimpleNamespace

import pytest
import torch

from app.config import Settings
from app.model import cache_sizing
from app.model.kv_cache import GIB, bytes_per_block


def _model(num_layers: int, num_kv_heads: int = 2, head_dim: int = 64):
    config = SimpleNamespace(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return SimpleNamespace(config=config)


SERVED, DRAFT = _model(num_layers=30), _model(num_layers=6)
BUDGET = 1.5 * GIB


@pytest.fixture
def measured_budget(monkeypatch):
    monkeypatch.setattr(cache_sizing, "cuda_cache_budget_bytes", lambda *args: BUDGET)


def _blocks(settings, device: str, draft=None) -> int:
    return cache_sizing.num_cache_blocks(
        SERVED,
        settings,
        torch.device(device),
        torch.float16,
        2048,
        draft_config=None if draft is None else draft.config,
    )


def test_on_a_gpu_the_draft_cache_shares_the_budget(measured_budget):
    settings = Settings()
    served = bytes_per_block(SERVED.config, settings.block_size, torch.float16)
    draft = bytes_per_block(DRAFT.config, settings.block_size, torch.float16)
    alone = _blocks(settings, "cuda")
    shared = _blocks(settings, "cuda", DRAFT)
    assert alone == int(BUDGET // served)
    assert shared == int(BUDGET // (served + draft))
    assert shared * (served + draft) <= BUDGET < alone * (served + draft)


def test_a_block_count_override_holds_for_both_caches(measured_budget):
    settings = Settings(num_gpu_blocks_override=100)
    assert _blocks(settings, "cuda", DRAFT) == 100


def test_on_the_cpu_the_setting_is_the_served_cache_alone():
    settings = Settings(kv_cache_gb=0.25)
    assert _blocks(settings, "cpu", DRAFT) == _blocks(settings, "cpu")
