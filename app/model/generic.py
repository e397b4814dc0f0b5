"""The generic backend: a decoder-only causal LM lamina has no code of its own for, run
by transformers' own modules with lamina's paged attention plugged in.

transformers calls every attention layer's kernel through a registry
(`AttentionInterface`), chosen by `config._attn_implementation`. lamina registers
"lamina_paged" there: the layer's rotated queries, keys and values arrive as
[1, heads, N, head_dim] for the step's flat batch (every sequence's new tokens in one
row of N), the keys and values are written to lamina's paged cache and each query
attends over its own sequence's cached keys, exactly as lamina's own models do. So
continuous batching, prefix caching, chunked prefill and preemption work unchanged.
Its nn.Linear layers are swapped for lamina's Linear (the kernel plan's matmuls, row
invariant); the other ops are transformers', one at a time (slower: nothing fuses).
transformers builds no mask for an implementation it does not know, and the rotary
embedding (or absolute positions) reads the position ids lamina passes.

The step's attention metadata reaches the registered function through a small context
object put on every module of the model at load: some models (StableLM) do not pass
extra forward arguments down to their attention layers.

Refused at start-up, in one line: an encoder-decoder or encoder-only model, a folder
whose architecture is not transformers' causal LM class for its model type, and a
model class that does not route attention through the registry.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.model.attention import AttentionMetadata, paged_attention
from app.model.config import ModelConfig, ModelLoadError, RopeScaling
from app.model.kv_cache import KVCache
from app.model.linear import KernelPlan, Linear, RowInvariance, RowKinds
from app.native import NativeKernels

logger = logging.getLogger(__name__)

ATTENTION_NAME = "lamina_paged"


@dataclass
class _Step:
    """What the registered attention function reads during one forward pass."""

    metadata: AttentionMetadata | None = None
    kv_cache: KVCache | None = None


def _paged_attention_for_transformers(
    module: nn.Module,
    query: torch.Tensor,  # [1, num_heads, N, head_dim], rotated
    key: torch.Tensor,  # [1, num_kv_heads, N, head_dim], rotated
    value: torch.Tensor,  # [1, num_kv_heads, N, head_dim]
    attention_mask: torch.Tensor | None,  # None: transformers builds none for this name
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # [1, N, num_heads, head_dim], no weights
    """transformers' attention-function signature over lamina's paged cache."""
    step: _Step | None = module.__dict__.get("_lamina_step")
    if step is None or step.metadata is None:
        raise RuntimeError("lamina's paged attention ran outside a lamina forward pass")
    if kwargs.get("s_aux") is not None or not getattr(module, "is_causal", True):
        raise NotImplementedError("attention sinks and non-causal attention are not supported")
    num_heads, num_tokens, head_dim = query.shape[1:]
    layer_cache = step.kv_cache.layer(module.layer_idx)
    if tuple(key.shape[1:2]) + tuple(key.shape[3:]) != (layer_cache.shape[1], layer_cache.shape[4]):
        raise ValueError(f"layer {module.layer_idx}'s keys {tuple(key.shape)} do not fit the cache")
    q = query[0].transpose(0, 1)  # [N, num_heads, head_dim]
    new_kv = torch.cat((key[0], value[0]), dim=0).transpose(0, 1)  # [N, 2 * kv_heads, head_dim]
    metadata = _metadata_for_window(step.metadata, sliding_window)
    scale = head_dim**-0.5 if scaling is None else scaling
    out = paged_attention(q, new_kv, layer_cache, metadata, scale, softcap)  # [N, heads * dim]
    return out.view(1, num_tokens, num_heads, head_dim), None


def _metadata_for_window(metadata: AttentionMetadata, window: int | None) -> AttentionMetadata:
    """The step's metadata seen through a layer's window (None: every key)."""
    if window is None:
        return metadata
    if metadata.local is not None and metadata.local.sliding_window == window:
        return metadata.local
    if metadata.native is not None:  # the native kernel takes any window per call
        return replace(metadata, sliding_window=window, local=None)
    raise ValueError(f"no attention metadata was built for a window of {window}")


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _paged_attention_for_transformers)


class _GivenHidden(nn.Module):
    """Stands in for the decoder inside the causal-LM wrapper: returns the hidden states
    it is handed, so the wrapper's own head (and whatever it does to the logits:
    scaling, soft-capping) runs on exactly the rows that sample."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None  # [1, S, hidden]

    def forward(self, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=self.hidden)


class GenericCausalLM(nn.Module):
    """A transformers causal LM behind the interface the runner uses (lamina's own
    models' forward / compute_logits over a flat batch and the paged cache)."""

    fuse_layers = False  # fused_layers.run_decoder: always this forward

    def __init__(
        self, hf_model: nn.Module, config: ModelConfig, native: NativeKernels | None
    ) -> None:
        super().__init__()
        self.hf = hf_model
        self.config = config
        self.native = native  # lamina's CPU kernels, for attention only
        self.lm_head = None  # the head is transformers' (no lamina kernel to inspect)
        prefix = hf_model.base_model_prefix
        self.decoder = getattr(hf_model, prefix)
        self._step = _Step()
        for module in hf_model.modules():  # plain attribute: not a submodule
            module.__dict__["_lamina_step"] = self._step
        self._given = _GivenHidden()
        head = copy.copy(hf_model)  # the same head and weights, the decoder swapped out
        head._modules = {**hf_model._modules, prefix: self._given}
        self.__dict__["_head"] = head  # not registered: its parameters are hf's
        first = next(hf_model.parameters())
        self._device, self._dtype = first.device, first.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def attention_backend(self) -> str:
        """ "bmm" for soft-capped scores; else "sdpa" on CUDA, "native" where lamina's
        CPU kernels were built, "bmm" otherwise."""
        if self.config.attn_logit_softcap is not None:
            return "bmm"
        if self.device.type == "cuda":
            return "sdpa"
        return "native" if self.native is not None else "bmm"

    @property
    def splits_rows_by_kind(self) -> bool:
        return False

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int64
        positions: torch.Tensor,  # [N] int64
        metadata: AttentionMetadata,
        kv_cache: KVCache,
        kinds: RowKinds | None = None,  # unused: one weight copy
    ) -> torch.Tensor:  # [N, hidden], after the decoder's final norm
        """transformers' decoder over the flat batch as one row of N tokens."""
        self._step.metadata, self._step.kv_cache = metadata, kv_cache
        try:
            out = self.decoder(
                input_ids=input_ids[None], position_ids=positions[None], use_cache=False
            )
        finally:
            self._step.metadata = self._step.kv_cache = None
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor, kinds: RowKinds | None = None) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] through transformers' own causal-LM forward, its
        decoder replaced by the given rows."""
        self._given.hidden = hidden[None]
        try:
            dummy_ids = torch.zeros(1, hidden.shape[0], dtype=torch.int64, device=hidden.device)
            logits = self._head(input_ids=dummy_ids, use_cache=False).logits
        finally:
            self._given.hidden = None
        return logits[0]


def _causal_lm_class(raw: dict[str, Any], hf_config) -> type:
    """transformers' causal-LM class for this folder, or ModelLoadError saying why not."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    architecture = (raw.get("architectures") or [None])[0]
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{architecture} is an encoder-decoder model, not a decoder-only LM")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None)
    if model_class is None:
        raise ModelLoadError(
            f"transformers has no causal LM for model_type {raw.get('model_type')!r}"
        )
    if architecture not in (None, model_class.__name__):
        raise ModelLoadError(
            f"{architecture} is not a causal LM (transformers' causal LM for model_type "
            f"{raw.get('model_type')!r} is {model_class.__name__})"
        )
    if not getattr(model_class, "_supports_attention_backend", False):
        raise ModelLoadError(
            f"transformers' {model_class.__name__} does not route its attention through "
            "AttentionInterface, so lamina's paged attention cannot be plugged in"
        )
    return model_class


def generic_config(model_dir: str | Path, raw: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a model for the generic backend (ModelLoadError if it cannot
    run there): what the KV cache and the runner need, from transformers' config."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"transformers cannot read {model_dir}/config.json: {exc}") from None
    model_class = _causal_lm_class(raw, hf_config)
    text = hf_config.get_text_config()
    num_heads = int(text.num_attention_heads)
    hidden_size = int(text.hidden_size)
    window = getattr(text, "sliding_window", None)
    cap = getattr(text, "attn_logit_softcapping", None)
    max_positions = getattr(text, "max_position_embeddings", None) or getattr(
        text, "n_positions", 2048
    )
    return ModelConfig(
        vocab_size=int(text.vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 0),
        num_layers=int(text.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden_size // num_heads),
        rms_norm_eps=0.0,  # transformers' modules hold their own norms
        rope_theta=0.0,  # and their own positions
        rope_scaling=RopeScaling(),
        max_position_embeddings=int(max_positions),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        architecture=model_class.__name__,
        # Layers that pass transformers a window read metadata.local (see
        # _metadata_for_window); which layers do is transformers' business.
        local_layers=tuple(range(int(text.num_hidden_layers))) if window else (),
        local_window=int(window) if window else None,
        attn_logit_softcap=None if cap is None else float(cap),
        generic=True,
    )


class _FlatLinear(nn.Module):
    """One of transformers' nn.Linear layers computed by lamina's Linear (its kernels:
    native matmuls on the CPU, each row computed the same way whatever the row count)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = Linear(linear.in_features, linear.out_features, linear.bias is not None)
        self.linear.weight = linear.weight
        if linear.bias is not None:
            self.linear.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        out = self.linear(x.reshape(-1, x.shape[-1]))  # [rows, out]
        return out.view(*x.shape[:-1], out.shape[-1])


def _use_lamina_linears(hf_model: nn.Module, plan: KernelPlan) -> None:
    """Swap every plain nn.Linear for lamina's, with the plan's kernels."""
    invariance = RowInvariance()
    for parent in list(hf_model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                flat = _FlatLinear(child)
                flat.linear.prepare_for_inference(plan, invariance)
                setattr(parent, name, flat)


def load_generic(
    model_dir: str | Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    plan: KernelPlan | None,
) -> GenericCausalLM:
    """transformers' model from the folder, its attention set to lamina's paged one and
    its linear layers to lamina's kernels (`plan`; None keeps transformers' own)."""
    from transformers import AutoModelForCausalLM

    _register_attention()
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype,
        attn_implementation=ATTENTION_NAME,
        local_files_only=True,
        use_safetensors=True,  # never pickles: they can run code
    )
    hf_model = hf_model.to(device).eval().requires_grad_(False)
    if plan is not None:
        _use_lamina_linears(hf_model, plan)
    logger.info(
        "backend: generic (transformers' %s modules, lamina's paged attention): lamina "
        "has no native implementation of %s",
        config.architecture,
        config.architecture,
    )
    return GenericCausalLM(hf_model, config, plan.native if plan is not None else None)
