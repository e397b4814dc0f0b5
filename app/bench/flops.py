"""Model FLOPs of a generation workload and a measured matmul peak, for model-FLOPs utilisation.

Only useful work counts (2 FLOPs per multiply-add): the decoder matmuls of every token
the model processes, attention against the keys each token actually sees (no padding),
and the vocabulary projection only for tokens whose logits are used (one per generated
token; prompt tokens never need logits). Norms, rotary and sampling are negligible.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class FlopCounts:
    """FLOPs of one forward, split by what they scale with."""

    per_token: float  # decoder-layer matmuls, per processed token
    per_visible_key: float  # attention scores and weighted values, per (token, key) pair
    per_logit_row: float  # lm_head, per token whose logits are computed

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> FlopCounts:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        layers = cfg["num_hidden_layers"]
        qkv = hidden * (heads + 2 * kv_heads) * head_dim
        out = heads * head_dim * hidden
        mlp = 3 * hidden * cfg["intermediate_size"]
        return cls(
            per_token=2 * layers * (qkv + out + mlp),
            per_visible_key=2 * layers * 2 * heads * head_dim,  # QK^T and PV
            per_logit_row=2 * hidden * cfg["vocab_size"],
        )

    def request(self, prompt_len: int, output_len: int) -> float:
        """FLOPs to generate output_len tokens after a prompt (the last one is never fed back)."""
        processed = prompt_len + output_len - 1
        visible_keys = processed * (processed + 1) / 2  # token at position p sees p + 1 keys
        return (
            processed * self.per_token
            + visible_keys * self.per_visible_key
            + output_len * self.per_logit_row
        )


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, seconds: float = 2.0
) -> tuple[float, str]:
    """Best sustained FLOP/s of a large matmul on this device and dtype, and which kernel.

    On the CPU both torch.mm (MKL) and oneDNN with a packed weight are tried: on some
    CPUs (AMD) oneDNN is much faster, and lamina's linear layers use it.
    """
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    candidates = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and _onednn_works(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
        candidates["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(
            a, packed, None, "none", [], ""
        )
    flops = 2 * size**3
    results = {name: _best_flops(fn, device, flops, seconds / 2) for name, fn in candidates.items()}
    best = max(results, key=results.get)
    return results[best], best


def _onednn_works(dtype: torch.dtype) -> bool:
    from app.model.linear import onednn_available

    return dtype in (torch.float32, torch.bfloat16) and onednn_available(dtype)


def _best_flops(fn, device: torch.device, flops_per_call: float, seconds: float) -> float:
    fn()  # warm-up: kernel selection, packing caches
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            fn()
        _sync(device)
        best = max(best, 4 * flops_per_call / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
