"""A stack of decoder layers (LLaMA's, or Gemma's with its sandwich norms) run by one
native call per step (decoder_stack.h: `lamina_decoder_stack`).

The per-op path calls the C matmul and attention from torch, ~150 kernels a step with
torch's own ops between them; at a few rows those ops' dispatch and the threads' wake-up
for every kernel cost as much as the arithmetic (measured on a 2-core Zen 4: 12 of 81 ms
per decode step at 32 sequences, 4.7 of 16 ms at one). Here the C side walks every layer
inside one parallel region. The descriptors of the weights are built once; a step only
passes its activations and attention metadata.

Plain tensors only: this module knows nothing of lamina's model classes (the model builds
the descriptions, app/model/llama.py).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from app.native.panels import WEIGHT_KINDS, panels_fit

_long, _float, _pointer, _int32 = ctypes.c_long, ctypes.c_float, ctypes.c_void_p, ctypes.c_int32


@dataclass(frozen=True)
class PackedLinear:
    """A linear layer's packed weights (NativeKernels.pack_weight): the panels prompt
    rows use and those generated rows use (the same tensor when there is one copy)."""

    prompt_panels: torch.Tensor  # [ceil(out / 64), in, 64] fp32 or fp16; bf16 in K-pairs
    generated_panels: torch.Tensor
    bias: torch.Tensor | None  # [out] fp32
    in_features: int
    out_features: int


@dataclass(frozen=True)
class DecoderLayerWeights:
    """One layer: norms, its four linear layers (q/k/v fused, gate/up fused), its cache."""

    input_norm: torch.Tensor  # [hidden] fp32
    post_attention_norm: torch.Tensor  # [hidden] fp32
    qkv: PackedLinear  # hidden -> q heads, k heads, v heads
    o: PackedLinear  # q heads -> hidden
    gate_up: PackedLinear  # hidden -> gate, up
    down: PackedLinear  # intermediate -> hidden
    keys: torch.Tensor  # [kv_heads, num_blocks, block_size, head_dim] fp32, contiguous
    values: torch.Tensor  # same layout as keys
    q_norm: torch.Tensor | None = None  # [head_dim] fp32: per-head RMSNorm of q (Qwen3)
    k_norm: torch.Tensor | None = None  # [head_dim] fp32: the same for k
    # Gemma: the MLP input's norm (post_attention_norm then normalizes the attention's
    # output) and the MLP output's norm, both [hidden] fp32; None for LLaMA layers.
    pre_feedforward_norm: torch.Tensor | None = None
    post_feedforward_norm: torch.Tensor | None = None
    window: int | None = None  # this layer's tokens see their last `window` keys only
    local_rope: bool = False  # rotated with the step's local tables (Gemma 3's local layers)


ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}  # decoder_stack.h: ACT_SILU, ACT_GELU_TANH


@dataclass(frozen=True)
class StackShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float  # of the scores: head_dim ** -0.5, or the family's own
    activation: str = "silu"  # the gated MLP's: SwiGLU, or GeGLU with gelu_pytorch_tanh
    softcap: float | None = None  # attention scores soft-capped (Gemma 2)


class _LinearDesc(ctypes.Structure):
    _fields_ = [
        ("panels", _pointer * 2),
        ("kind", _int32 * 2),  # WEIGHT_KINDS of each panels tensor
        ("bias", _pointer),
        ("in_features", _long),
        ("out_features", _long),
    ]


class _LayerDesc(ctypes.Structure):
    _fields_ = [
        ("input_norm", _pointer),
        ("post_attention_norm", _pointer),
        ("qkv", _LinearDesc),
        ("o", _LinearDesc),
        ("gate_up", _LinearDesc),
        ("down", _LinearDesc),
        ("keys", _pointer),
        ("values", _pointer),
        ("q_norm", _pointer),
        ("k_norm", _pointer),
        ("pre_feedforward_norm", _pointer),
        ("post_feedforward_norm", _pointer),
        ("window", _long),
        ("local_rope", ctypes.c_int),
    ]


class StackDesc(ctypes.Structure):
    _fields_ = [
        ("num_layers", _long),
        ("hidden", _long),
        ("num_heads", _long),
        ("num_kv_heads", _long),
        ("head_dim", _long),
        ("intermediate", _long),
        ("num_blocks", _long),
        ("block_size", _long),
        ("eps", _float),
        ("scale", _float),
        ("layers", ctypes.POINTER(_LayerDesc)),
        ("activation", ctypes.c_int),
        ("softcap", _float),
    ]


class StepDesc(ctypes.Structure):
    _fields_ = [
        ("x", _pointer),
        ("num_tokens", _long),
        ("split", _long),
        ("cos", _pointer),
        ("sin", _pointer),
        ("local_cos", _pointer),
        ("local_sin", _pointer),
        ("slots", _pointer),
        ("tables", _pointer),
        ("table_stride", _long),
        ("token_seq", _pointer),
        ("num_keys", _pointer),
        ("work", _pointer),
    ]


def describe_stack(layers: list[DecoderLayerWeights], shape: StackShape) -> StackDesc:
    """The C description of a stack. It points into the tensors: the caller keeps them."""
    _check_layers(layers)
    _check_shapes(layers, shape)
    descs = (_LayerDesc * len(layers))(*(_describe_layer(layer) for layer in layers))
    num_kv_heads, num_blocks, block_size, head_dim = layers[0].keys.shape
    if shape.activation not in ACTIVATIONS:
        raise ValueError(f"the stack's gated MLP has no {shape.activation!r} activation")
    stack = StackDesc(
        len(layers), layers[0].input_norm.numel(), shape.num_heads, num_kv_heads, head_dim,
        shape.intermediate, num_blocks, block_size, shape.eps, shape.scale, descs,
        ACTIVATIONS[shape.activation], shape.softcap or 0.0,
    )  # fmt: skip
    stack.local_rope = any(layer.local_rope for layer in layers)
    stack._layers = descs  # ctypes keeps no reference through a POINTER field
    return stack


def work_floats(stack: StackDesc, num_tokens: int) -> int:
    """Scratch a step of num_tokens rows needs (decoder_stack.h: step_desc.work)."""
    q_size = stack.num_heads * stack.head_dim
    width = q_size + 2 * stack.num_kv_heads * stack.head_dim
    return num_tokens * (stack.hidden + width + q_size + 3 * stack.intermediate)


def _describe_layer(layer: DecoderLayerWeights) -> _LayerDesc:
    return _LayerDesc(
        layer.input_norm.data_ptr(), layer.post_attention_norm.data_ptr(),
        _describe_linear(layer.qkv), _describe_linear(layer.o),
        _describe_linear(layer.gate_up), _describe_linear(layer.down),
        layer.keys.data_ptr(), layer.values.data_ptr(),
        _pointer_or_null(layer.q_norm), _pointer_or_null(layer.k_norm),
        _pointer_or_null(layer.pre_feedforward_norm), _pointer_or_null(layer.post_feedforward_norm),
        layer.window or 0, int(layer.local_rope),
    )  # fmt: skip


def _pointer_or_null(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _describe_linear(linear: PackedLinear) -> _LinearDesc:
    both = (linear.prompt_panels, linear.generated_panels)
    bias = None if linear.bias is None else linear.bias.data_ptr()
    return _LinearDesc(
        (_pointer * 2)(*(panels.data_ptr() for panels in both)),
        (_int32 * 2)(*(WEIGHT_KINDS[panels.dtype] for panels in both)),
        bias, linear.in_features, linear.out_features,
    )  # fmt: skip


def _check_layers(layers: list[DecoderLayerWeights]) -> None:
    """The C side trusts every pointer and size: check dtypes and layouts once, here."""
    if not layers:
        raise ValueError("a decoder stack needs at least one layer")
    for layer in layers:
        fp32 = [layer.input_norm, layer.post_attention_norm, layer.keys, layer.values]
        if (layer.q_norm is None) != (layer.k_norm is None):
            raise ValueError("q and k norms come together")
        feedforward = (layer.pre_feedforward_norm, layer.post_feedforward_norm)
        if (feedforward[0] is None) != (feedforward[1] is None):
            raise ValueError("the feed-forward norms come together")
        norms = (layer.q_norm, layer.k_norm, *feedforward)
        fp32 += [norm for norm in norms if norm is not None]
        linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
        fp32 += [linear.bias for linear in linears if linear.bias is not None]
        panels = [p for linear in linears for p in (linear.prompt_panels, linear.generated_panels)]
        for tensor in fp32 + panels:
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise ValueError("decoder stack tensors must be contiguous CPU tensors")
        if any(tensor.dtype != torch.float32 for tensor in fp32):
            raise ValueError("norms, biases and the KV cache must be fp32")
        if any(p.dtype not in WEIGHT_KINDS for p in panels):
            raise ValueError("panels are fp32, fp16 or bf16")
        if layer.keys.shape != layers[0].keys.shape or layer.values.shape != layer.keys.shape:
            raise ValueError("every layer's keys and values must have one shape")


def _check_shapes(layers: list[DecoderLayerWeights], shape: StackShape) -> None:
    """Each linear layer's sizes must chain as a LLaMA layer's do (the C side sizes its
    buffers from `shape`)."""
    hidden, head_dim = layers[0].input_norm.numel(), shape.head_dim
    q_size, kv_size = shape.num_heads * head_dim, shape.num_kv_heads * head_dim
    if layers[0].keys.shape[0] != shape.num_kv_heads or layers[0].keys.shape[3] != head_dim:
        raise ValueError("the KV cache does not match the attention heads")
    norms = [n for layer in layers for n in (layer.q_norm, layer.k_norm) if n is not None]
    if any(norm.shape != (head_dim,) for norm in norms):
        raise ValueError(f"q/k norms must be [{head_dim}]")
    if len(norms) not in (0, 2 * len(layers)):
        raise ValueError("every layer has q/k norms, or none does")
    expected = {
        "qkv": (hidden, q_size + 2 * kv_size),
        "o": (q_size, hidden),
        "gate_up": (hidden, 2 * shape.intermediate),
        "down": (shape.intermediate, hidden),
    }
    for layer in layers:
        for name, (in_features, out_features) in expected.items():
            linear = getattr(layer, name)
            sizes = (linear.in_features, linear.out_features)
            panels = (linear.prompt_panels, linear.generated_panels)
            if sizes != (in_features, out_features) or not all(
                panels_fit(p, in_features) for p in panels
            ):
                raise ValueError(f"{name} is not {in_features} -> {out_features}")
