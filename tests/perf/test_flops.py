"""Model-FLOPs accounting of the engine benchmark."""

from __future__ import annotations

import json

import pytest
import torch

from app.bench.flops import FlopCounts, measure_matmul_peak


def test_counts_follow_the_architecture(tmp_path):
    config = dict(
        hidden_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        num_hidden_layers=3,
        vocab_size=100,
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    counts = FlopCounts.from_model_dir(tmp_path)
    head_dim = 4
    per_layer = 8 * (2 + 2 * 1) * head_dim + 2 * head_dim * 8 + 3 * 8 * 16
    assert counts.per_token == 2 * 3 * per_layer
    assert counts.per_visible_key == 2 * 3 * 2 * 2 * head_dim
    assert counts.per_logit_row == 2 * 8 * 100
    # 3 prompt tokens, 2 generated: tokens at positions 0..3 are processed (4), they
    # see 1 + 2 + 3 + 4 keys, and 2 rows of logits are computed.
    expected = 4 * counts.per_token + 10 * counts.per_visible_key + 2 * counts.per_logit_row
    assert counts.request(3, 2) == expected


def test_default_model_is_about_270_megaflops_per_decoded_token(default_model_path):
    counts = FlopCounts.from_model_dir(default_model_path)
    per_token = counts.per_token + counts.per_logit_row
    assert 2.6e8 < per_token < 2.8e8  # 2 x 135M parameters, embeddings counted once


@pytest.mark.slow
def test_peak_is_measured_and_positive():
    flops, kernel = measure_matmul_peak(torch.device("cpu"), torch.float32, seconds=0.2)
    assert flops > 1e9 and kernel in ("torch.mm", "oneDNN")
