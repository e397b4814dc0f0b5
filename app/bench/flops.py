"""Model FLOPs per token and a measured matmul peak, for model-FLOPs utilisation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def model_flops_per_token(model_dir: Path, context_len: int) -> float:
    """Forward FLOPs for one token at a given context length (2 FLOPs per multiply-add).

    Counts every matmul: attention projections, MLP, lm_head, and the attention
    scores/values against `context_len` cached tokens. Norms and rotary are negligible.
    """
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg["intermediate_size"]
    layers = cfg["num_hidden_layers"]
    vocab = cfg["vocab_size"]
    qkv = hidden * (heads + 2 * kv_heads) * head_dim
    out = heads * head_dim * hidden
    mlp = 3 * hidden * inter
    attention = 2 * heads * head_dim * context_len  # QK^T and PV
    per_layer = 2 * (qkv + out + mlp + attention)
    return layers * per_layer + 2 * hidden * vocab


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best sustained FLOP/s of a large square matmul on this device and dtype."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops_per_matmul = 2 * size**3
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        _sync(device)
        best = max(best, 4 * flops_per_matmul / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
