"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): LLaMA with biases on the q, k and v projections
(none on o, none in the MLP, whatever config.json says: transformers fixes them so).

Qwen's optional sliding window (`use_sliding_window`, on the layers from
`max_window_layers` on, or as `layer_types` lists them) runs when it covers every layer;
a mix of windowed and full layers is refused (not implemented yet).
"""

from __future__ import annotations

from typing import Any

from app.model.config import Family, ModelLoadError
from app.model.llama import LlamaForCausalLM


def qwen_sliding_window(raw: dict[str, Any]) -> int | None:
    """The window every layer uses, or None when no layer has one."""
    window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    num_layers = int(raw["num_hidden_layers"])
    layer_types = raw.get("layer_types")
    if layer_types:
        windowed = [kind == "sliding_attention" for kind in layer_types]
    else:
        first = int(raw.get("max_window_layers", num_layers))
        windowed = [window is not None and i >= first for i in range(num_layers)]
    if not any(windowed):
        return None
    if window is None or not all(windowed):
        raise ModelLoadError(
            "sliding-window attention on some layers only (layer_types / max_window_layers) "
            "is not supported yet: lamina runs one window for every layer"
        )
    return int(window)


def _features(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "qkv_bias": True,
        "o_bias": False,
        "mlp_bias": False,
        "sliding_window": qwen_sliding_window(raw),
    }


FAMILY = Family("Qwen2ForCausalLM", LlamaForCausalLM, _features)
