"""Phi-3 (`Phi3ForCausalLM`): LLaMA whose checkpoint stores q/k/v as one `qkv_proj` and
gate/up as one `gate_up_proj` (lamina's own merged layout: loader.py renames them), with
no biases, and sliding-window attention when config.json sets `sliding_window`
(Phi-3-mini-4k does: 2047). Its long-context rope (`longrope`, Phi-3-128k, Phi-3.5,
Phi-4-mini) is config.py's; a `partial_rotary_factor` below 1 is refused at start-up."""

from __future__ import annotations

from app.model.config import Family
from app.model.llama import LlamaForCausalLM
from app.model.mistral import windowed_llama_features

# Its features are Mistral's: the merged layout is a loader matter.
FAMILY = Family("Phi3ForCausalLM", LlamaForCausalLM, windowed_llama_features)
