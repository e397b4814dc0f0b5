"""The fused decoder stack's family features on every build of the native kernels (gcc
and clang, each instruction-set level): Qwen3's per-head q/k norms, a sliding window
(Qwen's own setting, on every layer) and head_dim 24 (the scalar tails) give what the
per-op path gives."""

from __future__ import annotations

import pytest

from app.model.loader import load_model
from tests.model.helpers import save_random_model
from tests.unit.test_fused_layers import assert_fused_matches_per_op, model_kernels  # noqa: F401


@pytest.fixture(scope="module")
def windowed_qwen3_path(tmp_path_factory):
    return save_random_model(
        tmp_path_factory.mktemp("qwen3-window"),
        "Qwen3Config",
        seed=5,
        head_dim=24,
        use_sliding_window=True,
        sliding_window=7,  # two_steps runs prompts of 21 and 15 tokens
        max_window_layers=0,  # from the first layer on: every layer
    )


def test_q_k_norms_and_window_fused_match_per_op_on_every_build(
    model_kernels,  # noqa: F811
    windowed_qwen3_path,
):
    model = load_model(windowed_qwen3_path, max_positions=256)
    assert model.native is model_kernels
    assert model.config.qk_norm and model.config.sliding_window == 7
    assert_fused_matches_per_op(model)
