"""How a Hugging Face checkpoint's tensor names map onto lamina's modules: which are
renamed, and which are merged into one weight (q, k and v into qkv_proj; gate and up into
gate_up_proj, so every layer runs two matmuls fewer per step). Shared by the loader and
by what reads a GGUF file's blocks for those modules (gguf_int4.py)."""

from __future__ import annotations

# HF projection name -> (our merged module, position of this part in the merged weight)
MERGED_PARTS = {
    "self_attn.q_proj": ("attn.qkv_proj", 0),
    "self_attn.k_proj": ("attn.qkv_proj", 1),
    "self_attn.v_proj": ("attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
NUM_PARTS = {"attn.qkv_proj": 3, "mlp.gate_up_proj": 2}
RENAMED = {
    "self_attn.o_proj": "attn.o_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "pre_feedforward_norm",  # Gemma's extra norms
    "post_feedforward_layernorm": "post_feedforward_norm",
    "self_attn.qkv_proj": "attn.qkv_proj",  # Phi-3 stores them merged already
    "mlp.gate_up_proj": "mlp.gate_up_proj",
    "self_attn.q_norm": "attn.q_norm",  # Qwen3's per-head norms
    "self_attn.k_norm": "attn.k_norm",
}
TOP_LEVEL = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def split_layer_name(name: str) -> tuple[str, str, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> ('layers.3', 'mlp.up_proj', 'weight')."""
    if not name.startswith("model.layers."):
        return None
    _, _, index, *rest = name.split(".")
    return f"layers.{index}", ".".join(rest[:-1]), rest[-1]


def module_parts(hf_names: list[str]) -> dict[str, list[str]]:
    """Our Linear modules' names -> the checkpoint weights each is made of, in merge order
    (['model.layers.0.self_attn.q_proj.weight', ...] -> {'layers.0.attn.qkv_proj': [q, k,
    v], ...}); names of no layer module are left out."""
    modules: dict[str, list[str | None]] = {}
    for name in hf_names:
        parts = split_layer_name(name)
        if parts is None or parts[2] != "weight":
            continue
        layer, module, _ = parts
        if module in MERGED_PARTS:
            merged, position = MERGED_PARTS[module]
            slots = modules.setdefault(f"{layer}.{merged}", [None] * NUM_PARTS[merged])
            slots[position] = name
        elif module in RENAMED:
            modules[f"{layer}.{RENAMED[module]}"] = [name]
    return {module: [n for n in names if n is not None] for module, names in modules.items()}
