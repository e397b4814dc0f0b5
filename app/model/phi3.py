"""Phi-3 (`Phi3ForCausalLM`): LLaMA whose checkpoint stores q/k/v as one `qkv_proj` and
gate/up as one `gate_up_proj` (lamina's own merged layout: loader.py renames them), with
no biases, and sliding-window attention when config.json sets `sliding_window`
(Phi-3-mini-4k does: 2047). Its long-context rope (`longrope`) and a
`partial_rotary_factor` below 1 are refused at start-up (config.py)."""

from __future__ import annotations

from typing import Any

from app.model.config import Family
from app.model.llama import LlamaForCausalLM


def _features(raw: dict[str, Any]) -> dict[str, Any]:
    window = raw.get("sliding_window")
    return {
        "qkv_bias": False,
        "o_bias": False,
        "mlp_bias": False,
        "sliding_window": None if window is None else int(window),
    }


FAMILY = Family("Phi3ForCausalLM", LlamaForCausalLM, _features)
