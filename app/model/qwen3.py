"""Qwen3 dense (`Qwen3ForCausalLM`): LLaMA with an RMSNorm over each q and k head before
the rotary embedding (`self_attn.q_norm` / `k_norm`, [head_dim] weights); biases only
where `attention_bias` says (q, k, v and o together, as in LLaMA); head_dim is its own
field. The sliding window reads as Qwen2's."""

from __future__ import annotations

from typing import Any

from app.model.config import Family
from app.model.llama import LlamaForCausalLM
from app.model.qwen2 import qwen_sliding_window


def _features(raw: dict[str, Any]) -> dict[str, Any]:
    return {"qk_norm": True, "mlp_bias": False, "sliding_window": qwen_sliding_window(raw)}


FAMILY = Family("Qwen3ForCausalLM", LlamaForCausalLM, _features)
