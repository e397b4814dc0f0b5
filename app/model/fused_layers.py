"""The decoder layers as one native call per step, where lamina's C kernels run them.

`FusedLayers` describes a loaded model's layers (weights already packed by their
NativeLinearKernels) and one KV cache to app.native's decoder stack, once; each step it
passes the residual stream, the rotary rows, the slots and the attention inputs. The
result equals the per-op path's up to rounding (the norms, the rotary embedding and SiLU
are lamina's own code instead of torch's ops; the matmuls and attention are the same
kernels), and every row is still computed on its own, so batch invariance holds.

Prompt and generated rows (fp16 weights: RowKinds) take different weight copies; the C
side takes them as two row ranges, so mixed rows are put in kind order for the call and
back in row order after it.
"""

from __future__ import annotations

from typing import Protocol
from weakref import WeakKeyDictionary

import torch
from torch import nn

from app.model.attention import AttentionMetadata
from app.model.config import ModelConfig
from app.model.kv_cache import KVCache
from app.model.linear import GENERATED, PROMPT, Linear, NativeLinearKernel, RowKinds
from app.native import NativeKernels
from app.native.stack import (
    ACTIVATIONS,
    DecoderLayerWeights,
    PackedLinear,
    StackDesc,
    StackShape,
    describe_stack,
)


class RotaryTables(Protocol):
    cos: torch.Tensor  # [max_positions, head_dim]
    signed_sin: torch.Tensor  # [max_positions, head_dim]


class FusableModel(Protocol):
    """What the fused path reads of a model (llama.LlamaForCausalLM and gemma's have it).
    Named here by shape, not by class, so the model may choose this path without a
    circle."""

    config: ModelConfig
    native: NativeKernels | None
    rotary: RotaryTables
    local_rotary: RotaryTables | None  # Gemma 3's local layers' own tables, else None
    fuse_layers: bool  # the path chosen at load (loader.py, from why_not_fused)
    norm: nn.Module  # the final norm
    layers: nn.ModuleList  # each: input_norm, attn.qkv_proj / o_proj (and q_norm / k_norm,
    # None or [head_dim]), post_attention_norm, mlp.gate_up_proj / down_proj; Gemma's
    # also pre_feedforward_norm and post_feedforward_norm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [N] -> [N, hidden]

    def layer_window(self, index: int) -> int | None: ...  # keys layer `index` sees

    def layer_rotates_locally(self, index: int) -> bool: ...  # with local_rotary


def why_not_fused(model: FusableModel) -> str | None:
    """None when every decoder-layer Linear runs lamina's native matmul (fp32
    activations), so the layers can run as one native call; else why they run one op at
    a time (the start-up log says it)."""
    if model.native is None:
        return "lamina's native CPU kernels are not in use (a GPU, kernels=torch, or no compiler)"
    if model.config.hidden_act not in ACTIVATIONS:
        return f"the fused stack's MLP is SwiGLU or GeGLU, not {model.config.hidden_act}"
    linears = [m for layer in model.layers for m in layer.modules() if isinstance(m, Linear)]
    kernels = [k for m in linears for k in (m.kernel, m.prompt_kernel) if k is not None]
    if not linears or not all(isinstance(k, NativeLinearKernel) for k in kernels):
        return "some linear layers run torch's or oneDNN's kernels (the model dtype is not fp32)"
    return None


def run_decoder(
    model: FusableModel,
    input_ids: torch.Tensor,  # [N] int64
    positions: torch.Tensor,  # [N] int64
    metadata: AttentionMetadata,
    kv_cache: KVCache,
    kinds: RowKinds | None = None,
) -> torch.Tensor:  # [N, hidden], after the final norm
    """The model's forward on the path chosen for it at load: the fused native stack when
    `model.fuse_layers` and this step's attention is native (the runner's backend), else
    the model's own per-op forward. The model's code is the math; the path is chosen
    here, once per step, for the runner and the tests alike."""
    if not (model.fuse_layers and metadata.native is not None):
        return model(input_ids, positions, metadata, kv_cache, kinds)
    x = model.embed(input_ids)
    return model.norm(bound_layers(model, kv_cache)(x, positions, metadata, kinds))


_BOUND: WeakKeyDictionary[nn.Module, FusedLayers] = WeakKeyDictionary()


def bound_layers(model: FusableModel, kv_cache: KVCache) -> FusedLayers:
    """The model's layers described to the C side for `kv_cache` (kept for the last
    cache seen: describing them costs a walk over every weight)."""
    fused = _BOUND.get(model)
    if fused is None or fused.kv_cache is not kv_cache:
        fused = _BOUND[model] = FusedLayers(model, kv_cache)
    return fused


class FusedLayers:
    """A model's decoder layers bound to one KV cache, run by NativeKernels.decoder_stack."""

    def __init__(self, model: FusableModel, kv_cache: KVCache) -> None:
        config = model.config
        self.kv_cache = kv_cache
        self.native = model.native
        self.rotary = model.rotary
        self.local_rotary = model.local_rotary
        self.layers = [
            _layer_weights(
                layer,
                kv_cache.layer(index),
                model.layer_window(index),
                model.layer_rotates_locally(index),
            )
            for index, layer in enumerate(model.layers)
        ]  # kept alive: the description points into them
        shape = StackShape(
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.intermediate_size,
            config.rms_norm_eps,
            config.query_scale or config.head_dim**-0.5,
            config.hidden_act,
            config.attn_logit_softcap,
        )
        self.stack: StackDesc = describe_stack(self.layers, shape)

    def __call__(
        self,
        x: torch.Tensor,  # [N, hidden] fp32: the embeddings, updated in place
        positions: torch.Tensor,  # [N] int64
        metadata: AttentionMetadata,  # backend "native"
        kinds: RowKinds | None,
    ) -> torch.Tensor:  # [N, hidden]: after the last layer, before the final norm
        inputs = metadata.native
        cos, signed_sin = self.rotary.cos[positions], self.rotary.signed_sin[positions]
        local = None
        if self.local_rotary is not None:  # [N, head_dim] each
            local = self.local_rotary.cos[positions], self.local_rotary.signed_sin[positions]
        slots, token_seq, num_keys = metadata.slot_mapping, inputs.token_seq, inputs.num_keys
        num_tokens = x.shape[0]
        if kinds is None or kinds.uniform == PROMPT:
            split, order = num_tokens, None  # one weight copy, or prompt rows only
        elif kinds.uniform == GENERATED:
            split, order = 0, None
        else:
            split = kinds.prompt_rows.numel()
            order = torch.cat((kinds.prompt_rows, kinds.generated_rows))  # [N]: kind order
            x, cos, signed_sin = x[order], cos[order], signed_sin[order]
            slots, token_seq, num_keys = slots[order], token_seq[order], num_keys[order]
            if local is not None:
                local = local[0][order], local[1][order]
        self.native.decoder_stack(
            self.stack,
            x,
            split,
            cos,
            signed_sin,
            slots,
            inputs.block_tables,
            token_seq,
            num_keys,
            local,
        )
        if order is None:
            return x
        return torch.empty_like(x).index_copy_(0, order, x)  # back in row order


def _layer_weights(
    layer: nn.Module, cache: torch.Tensor, window: int | None, local_rope: bool
) -> DecoderLayerWeights:
    """cache: the layer's [2, kv_heads, num_blocks, block_size, head_dim]."""
    return DecoderLayerWeights(
        input_norm=layer.input_norm.weight.detach().contiguous(),
        post_attention_norm=layer.post_attention_norm.weight.detach().contiguous(),
        qkv=_packed(layer.attn.qkv_proj),
        o=_packed(layer.attn.o_proj),
        gate_up=_packed(layer.mlp.gate_up_proj),
        down=_packed(layer.mlp.down_proj),
        keys=cache[0],
        values=cache[1],
        q_norm=_norm_weight(layer.attn.q_norm),
        k_norm=_norm_weight(layer.attn.k_norm),
        pre_feedforward_norm=_norm_weight(getattr(layer, "pre_feedforward_norm", None)),
        post_feedforward_norm=_norm_weight(getattr(layer, "post_feedforward_norm", None)),
        window=window,
        local_rope=local_rope,
    )


def _norm_weight(norm: nn.Module | None) -> torch.Tensor | None:
    return None if norm is None else norm.weight.detach().contiguous()


def _packed(linear: Linear) -> PackedLinear:
    generated = linear.kernel  # every row, or the generated ones when there are two
    prompt = linear.prompt_kernel or generated
    return PackedLinear(
        prompt.panels, generated.panels, generated.bias, linear.in_features, linear.out_features
    )
