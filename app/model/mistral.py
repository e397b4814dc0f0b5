"""Mistral (`MistralForCausalLM`): LLaMA with no biases and, when config.json sets
`sliding_window`, sliding-window attention on every layer: the token at position p
attends to keys p - window + 1 .. p only (attention.py, and the native kernel)."""

from __future__ import annotations

from typing import Any

from app.model.config import Family
from app.model.llama import LlamaForCausalLM


def windowed_llama_features(raw: dict[str, Any]) -> dict[str, Any]:
    """LLaMA without biases, with config.json's `sliding_window` (None: every key)."""
    window = raw.get("sliding_window")
    return {
        "qkv_bias": False,
        "o_bias": False,
        "mlp_bias": False,
        "sliding_window": None if window is None else int(window),
    }


FAMILY = Family("MistralForCausalLM", LlamaForCausalLM, windowed_llama_features)
