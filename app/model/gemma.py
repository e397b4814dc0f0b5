"""Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3 text (`Gemma3ForCausalLM`): LLaMA's
attention and gated MLP with these differences, each named where it is computed:

- the MLP is GeGLU: the tanh-approximated GELU (`hidden_activation`) in silu's place;
- four RMSNorms a layer: before and after the attention, before and after the MLP (the
  "post" norms act on the sublayer's output, before the residual add);
- every RMSNorm scales by (1 + weight), not weight: `finish_loading` adds the 1 once;
- the embeddings are multiplied by sqrt(hidden_size) (the tied head's matrix is not);
- scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5;
- Gemma 2 soft-caps the attention scores (cap * tanh(scores / cap), before the mask;
  the "bmm" and native attention compute it, so on CUDA the model asks for "bmm") and
  the final logits; Gemma 3 normalizes each q and k head (like Qwen3) and caps nothing;
- local and global layers interleave (`layer_types`, or every second layer for Gemma 2,
  five of every six for Gemma 3): local layers see their last `sliding_window` keys only
  (the runner builds the batch's attention metadata twice, `metadata.local`) and, in
  Gemma 3, rotate with a rope base of their own (`rope_local_base_freq`, 10 000).

The fused native stack runs all of it (decoder_stack.h: the sandwich norms, GeGLU,
per-layer windows and rope tables, the scores' soft-cap); the embedding scale and the
final soft-cap stay in torch, around it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from app.model.attention import AttentionMetadata
from app.model.config import Family, ModelConfig, ModelLoadError, RopeScaling, parse_rope
from app.model.kv_cache import KVCache
from app.model.linear import KernelPlan, RowKinds
from app.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, RMSNorm, RotaryEmbedding

_LAYER_KINDS = ("sliding_attention", "full_attention")


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LlamaAttention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.post_feedforward_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # this layer's: local or global
        metadata: AttentionMetadata,  # this layer's: windowed or not
        cache: torch.Tensor,
        kinds: RowKinds | None = None,
    ) -> torch.Tensor:
        attended = self.attn(self.input_norm(x), rope, metadata, cache, kinds)
        x = x.add_(self.post_attention_norm(attended))
        mixed = self.mlp(self.pre_feedforward_norm(x), kinds)
        return x.add_(self.post_feedforward_norm(mixed))


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 and Gemma 3 text. Build on the meta device; loader.load_model fills it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config) for _ in range(config.num_layers))
        self.local_layers = frozenset(config.local_layers)
        # Gemma 3's local layers rotate with a base of their own (self.local_rotary).
        if config.local_rope_theta is not None:
            local = replace(config, rope_theta=config.local_rope_theta, rope_scaling=RopeScaling())
            self.local_rotary = RotaryEmbedding(local)
        self.embed_scale: torch.Tensor | None = None  # sqrt(hidden) in the model dtype

    def finish_loading(
        self, device: torch.device, max_positions: int, plan: KernelPlan | None
    ) -> None:
        """LLaMA's, plus: the norms' (1 + weight) computed once, the local rope table,
        and the embedding scale rounded to the model dtype as transformers does."""
        for module in self.modules():
            if isinstance(module, RMSNorm):  # new memory: the loaded weight may be a file view
                module.weight = nn.Parameter(module.weight + 1.0, requires_grad=False)
        super().finish_loading(device, max_positions, plan)
        dtype = self.rotary.cos.dtype
        if self.local_rotary is not None:
            self.local_rotary.build_cache(max_positions, device, dtype)
        self.embed_scale = torch.tensor(self.config.hidden_size**0.5).to(device, dtype)

    @property
    def attention_backend(self) -> str:
        """LLaMA's, except that soft-capped scores (Gemma 2) on CUDA need the "bmm"
        backend (torch's sdpa has no soft-cap)."""
        backend = super().attention_backend
        if self.config.attn_logit_softcap is not None and backend == "sdpa":
            return "bmm"
        return backend

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [N] int64 -> [N, hidden]
        """The embeddings times sqrt(hidden_size), rounded to the model dtype."""
        return self.embed_tokens(input_ids) * self.embed_scale

    def layer_window(self, index: int) -> int | None:
        """Local layers see their last `local_window` keys; global ones every key."""
        return self.config.local_window if index in self.local_layers else None

    def layer_rotates_locally(self, index: int) -> bool:
        return self.local_rotary is not None and index in self.local_layers

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int64
        positions: torch.Tensor,  # [N] int64
        metadata: AttentionMetadata,
        kv_cache: KVCache,
        kinds: RowKinds | None = None,
    ) -> torch.Tensor:  # [N, hidden], after the final norm
        """One op at a time (fused_layers.run_decoder picks between this and the fused
        native stack). `metadata.local` must be set when the model has local layers
        (build_attention_metadata's local_window)."""
        if self.local_layers and metadata.local is None:
            raise ValueError("Gemma's local layers need metadata.local (pass local_window)")
        x = self.embed(input_ids)  # [N, hidden]
        global_rope = self.rotary.lookup(positions)
        local_rope = global_rope
        if self.local_rotary is not None:
            local_rope = self.local_rotary.lookup(positions)
        for index, layer in enumerate(self.layers):
            if index in self.local_layers:
                x = layer(x, local_rope, metadata.local, kv_cache.layer(index), kinds)
            else:
                x = layer(x, global_rope, metadata, kv_cache.layer(index), kinds)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, kinds: RowKinds | None = None) -> torch.Tensor:
        """[S, hidden] -> [S, vocab], soft-capped when the config says so (Gemma 2)."""
        logits = super().compute_logits(hidden, kinds)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits


def _layer_kinds(raw: dict[str, Any], every: int) -> list[str]:
    """Each layer's kind: config.json's `layer_types`, else transformers' default
    pattern (the last of every `every` layers is global)."""
    num_layers = int(raw["num_hidden_layers"])
    kinds = raw.get("layer_types")
    if not kinds:
        kinds = [_LAYER_KINDS[(i + 1) % every == 0] for i in range(num_layers)]
    unknown = sorted(set(kinds) - set(_LAYER_KINDS))
    if unknown or len(kinds) != num_layers:
        raise ModelLoadError(
            f"layer_types must list {num_layers} of {', '.join(_LAYER_KINDS)}, not {kinds}"
        )
    return kinds


def _shared_features(raw: dict[str, Any], every: int, softcaps: tuple) -> dict[str, Any]:
    """What Gemma 2 and 3 read alike; softcaps: transformers' defaults (attention, final)."""
    if raw.get("use_bidirectional_attention"):
        raise ModelLoadError("use_bidirectional_attention is set: lamina runs causal decoders only")
    kinds = _layer_kinds(raw, every)
    window = raw.get("sliding_window")
    local = tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")
    attn_cap = raw.get("attn_logit_softcapping", softcaps[0])
    final_cap = raw.get("final_logit_softcapping", softcaps[1])
    return {
        "mlp_bias": False,
        "hidden_act": str(raw.get("hidden_activation") or "gelu_pytorch_tanh"),
        "local_layers": local if window is not None else (),
        "local_window": int(window) if window is not None and local else None,
        "query_scale": float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        "attn_logit_softcap": None if attn_cap is None else float(attn_cap),
        "final_logit_softcap": None if final_cap is None else float(final_cap),
    }


def _gemma2_features(raw: dict[str, Any]) -> dict[str, Any]:
    return _shared_features(raw, every=2, softcaps=(50.0, 30.0))


def _gemma3_rope(raw: dict[str, Any]) -> dict[str, Any]:
    """Global layers: rope_theta with its scaling; local ones: default rope with their
    own base. Both layouts: transformers-5 `rope_parameters` per layer kind, or
    `rope_theta` + `rope_scaling` + `rope_local_base_freq`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        theta, scaling = parse_rope({**raw, "rope_parameters": params["full_attention"]})
        local = params.get("sliding_attention") or {}
        local_theta, local_scaling = parse_rope({**raw, "rope_parameters": local})
        if local_scaling.rope_type != "default":
            raise ModelLoadError(
                f"rope type {local_scaling.rope_type!r} on Gemma 3's local layers is not "
                "supported: lamina rotates them with the default rope"
            )
    else:
        theta, scaling = parse_rope({**raw, "rope_theta": raw.get("rope_theta", 1e6)})
        local_theta = float(raw.get("rope_local_base_freq", 10000.0))
    return {"rope_theta": theta, "rope_scaling": scaling, "local_rope_theta": local_theta}


def _gemma3_features(raw: dict[str, Any]) -> dict[str, Any]:
    every = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
    features = _shared_features(raw, every=every, softcaps=(None, None))
    return {**features, **_gemma3_rope(raw), "qk_norm": True}


GEMMA2 = Family("Gemma2ForCausalLM", GemmaForCausalLM, _gemma2_features)
GEMMA3 = Family("Gemma3ForCausalLM", GemmaForCausalLM, _gemma3_features)
