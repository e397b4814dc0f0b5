"""LLaMA over a flat batch of tokens: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

The families built on LLaMA (qwen2.py, qwen3.py, mistral.py) run this same model with
ModelConfig's switches on: q/k/v and o biases, per-head q/k norms, a sliding window.

There is no batch dimension: the tokens of every sequence in a step are concatenated
into N rows, and the attention metadata says which rows belong together and where
their keys and values live in the paged cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.model.attention import AttentionMetadata, paged_attention
from app.model.config import Family, ModelConfig, rope_inverse_frequencies
from app.model.embedding import PanelEmbedding, TokenEmbedding
from app.model.kv_cache import KVCache
from app.model.linear import (
    KernelPlan,
    Linear,
    NativeLinearKernel,
    RowInvariance,
    RowKinds,
    TorchLinearKernel,
    head_plan,
)
from app.native import NativeKernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        if x.dtype == torch.float32:
            # One fused op; measured bitwise equal to the formula below in fp32.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Statistics in fp32 whatever the model dtype, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotates each (i, i + head_dim/2) pair of q and k by position * inv_freq[i].

    cos/sin are precomputed for every position once, so a step only gathers rows. The
    sine table carries the sign of the rotation (-sin on the first half), which saves a
    negation per layer and gives the same bits: -(a * b) == a * -b exactly.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.cos: torch.Tensor | None = None  # [max_positions, head_dim]
        self.signed_sin: torch.Tensor | None = None  # [max_positions, head_dim]

    def build_cache(self, max_positions: int, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = rope_inverse_frequencies(self.config, max_positions).to(device)  # [head_dim/2]
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        angles = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)  # [max_positions, head_dim]
        cos, sin = angles.cos(), angles.sin()
        scale = self.config.rope_scaling.attention_factor  # yarn's, longrope's; else 1
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        self.cos = cos.to(dtype)
        sin = sin.to(dtype)
        half = sin.shape[-1] // 2
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for each token: [N] -> two [N, 1, head_dim] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotate x [N, heads, head_dim] in place: x * cos + rotate_half(x) * sin (same bits);
    cos/sin [N, 1, head_dim]."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # rotate_half without the sign
    x.mul_(cos).add_(swapped.mul_(signed_sin))


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.query_scale or config.head_dim**-0.5
        self.softcap = config.attn_logit_softcap  # Gemma 2's, on the scores
        self.split_sizes = (config.q_size, config.kv_size, config.kv_size)
        self.qkv_proj = Linear(config.hidden_size, sum(self.split_sizes), config.qkv_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, config.o_bias)
        # Qwen3: an RMSNorm over each q head and each k head, before the rotation.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [N, 1, head_dim]
        metadata: AttentionMetadata,
        cache: torch.Tensor,  # this layer's keys and values: [2, kv_heads, blocks, block, dim]
        kinds: RowKinds | None = None,  # which rows are prompt tokens (see linear.py)
    ) -> torch.Tensor:  # [N, hidden]
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, kinds)  # [N, q_size + 2 * kv_size]: ours, so rotated in place
        num_q, num_qk = self.split_sizes[0], self.split_sizes[0] + self.split_sizes[1]
        heads = (num_tokens, -1, self.head_dim)
        if self.q_norm is not None:
            q_heads, k_heads = qkv[:, :num_q].view(heads), qkv[:, num_q:num_qk].view(heads)
            q_heads.copy_(self.q_norm(q_heads))
            k_heads.copy_(self.k_norm(k_heads))
        # q and k are adjacent in the fused projection: rotate them in one go.
        apply_rotary_(qkv[:, :num_qk].view(heads), *rope)
        q = qkv[:, :num_q].view(heads)  # [N, num_heads, head_dim]
        new_kv = qkv[:, num_q:].view(heads)  # [N, 2 * num_kv_heads, head_dim]
        out = paged_attention(q, new_kv, cache, metadata, self.scale, self.softcap)
        return self.o_proj(out, kinds)  # [N, num_heads * head_dim] in


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# config.hidden_act -> the gate's activation (SUPPORTED_ACTIVATIONS in config.py)
GATE_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": _gelu_tanh}


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up as one matmul (GeGLU, the
    tanh-approximated GELU in silu's place, when config.hidden_act says so: Gemma)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = GATE_ACTIVATIONS[config.hidden_act]
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, config.mlp_bias
        )
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias)

    def forward(
        self, x: torch.Tensor, kinds: RowKinds | None = None
    ) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        gate, up = self.gate_up_proj(x, kinds).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.activation(gate) * up, kinds)  # [N, intermediate] in


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LlamaAttention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        cache: torch.Tensor,
        kinds: RowKinds | None = None,
    ) -> torch.Tensor:
        x = x.add_(self.attn(self.input_norm(x), rope, metadata, cache, kinds))
        return x.add_(self.mlp(self.post_attention_norm(x), kinds))


def _embedding_from_head(head: Linear, embedding: nn.Module) -> nn.Module | None:
    """A tied embedding read from the copy of the matrix the head keeps, where that copy
    gives the rows the embedding serves (fp32 panels of the native kernel, a torch
    kernel's weight in fp32, the stored dtype or the model dtype, the weight itself
    without a kernel); None where none does."""
    out_dtype = embedding.out_dtype
    if head.kernel is None:
        return TokenEmbedding.over(head.weight, out_dtype)
    for kernel in (head.prompt_kernel, head.kernel):
        if isinstance(kernel, NativeLinearKernel) and kernel.panels.dtype == torch.float32:
            return PanelEmbedding(kernel.panels, out_dtype)
        if isinstance(kernel, TorchLinearKernel) and embedding.same_rows_from(kernel.weight.dtype):
            return TokenEmbedding.over(kernel.weight, out_dtype)
    return None


class LlamaForCausalLM(nn.Module):
    """Decoder-only LLaMA (and the families that differ from it only by ModelConfig's
    switches). Build on the meta device; loader.load_model fills it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Stored as the checkpoint has it where the model dtype holds it exactly (embedding.py)
        self.embed_tokens: nn.Module = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.local_rotary: RotaryEmbedding | None = None  # a family's local layers' own
        self.native: NativeKernels | None = None  # lamina's CPU kernels, when the plan uses them
        # The path chosen for the decoder layers at load: True runs them as one native
        # call per step (fused_layers.run_decoder; the loader sets it where every Linear is
        # native); False, this forward's per-op path (tests and benchmarks compare).
        self.fuse_layers = False
        # Shapes repeat across layers: each kernel shape's row invariance is calibrated once.
        self.row_invariance = RowInvariance()

    def pack_linears(self, root: nn.Module, plan: KernelPlan | None) -> None:
        """Give every Linear under `root` that has no kernel yet its kernel (`plan`, the
        head's plan for lm_head), which drops the loaded weight: the loader calls it on
        each decoder layer as soon as the layer is loaded, finish_loading on the rest."""
        if plan is None:
            return  # F.linear on the loaded weights
        for module in root.modules():
            if isinstance(module, Linear) and module.kernel is None:
                module_plan = head_plan(plan) if module is self.lm_head else plan
                module.prepare_for_inference(module_plan, self.row_invariance)

    def finish_loading(
        self, device: torch.device, max_positions: int, plan: KernelPlan | None
    ) -> None:
        """After the weights were assigned: the embedding as served (embedding.py), the
        head re-tied, rope tables built, and every Linear not packed yet given its kernel
        (`plan`; None keeps F.linear on the loaded weights)."""
        dtype = self.norm.weight.dtype  # the model dtype (the embedding may be narrower)
        self.embed_tokens = self.embed_tokens.finish(device, dtype)
        tied = self.config.tie_word_embeddings
        if tied:
            weight = self.embed_tokens.tied_weight()  # [vocab, hidden]
            if plan is None:  # F.linear multiplies at the model dtype
                weight = weight.to(dtype)
            self.lm_head.weight = nn.Parameter(weight, requires_grad=False)
        self.rotary.build_cache(max_positions, device, dtype)
        if plan is not None:
            self.native = plan.native
            self.pack_linears(self, plan)
        if tied:  # one copy of the tied matrix where the head's holds it exactly
            self.embed_tokens = _embedding_from_head(self.lm_head, self.embed_tokens) or (
                self.embed_tokens
            )

    @property
    def device(self) -> torch.device:
        return self.rotary.cos.device

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype: activations, norms and the KV cache."""
        return self.rotary.cos.dtype

    @property
    def max_positions(self) -> int:
        return self.rotary.cos.shape[0]

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int64
        positions: torch.Tensor,  # [N] int64
        metadata: AttentionMetadata,
        kv_cache: KVCache,
        kinds: RowKinds | None = None,  # [N] rows' token kinds, for two-kernel Linears
    ) -> torch.Tensor:  # [N, hidden], after the final norm
        """The per-op path: torch calls each layer's ops (fused_layers.run_decoder picks
        between this and the fused native stack)."""
        x = self.embed(input_ids)
        rope = self.rotary.lookup(positions)  # shared by every layer
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, metadata, kv_cache.layer(index), kinds)
        return self.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [N] int64 -> [N, hidden]
        """The first layer's input (both paths embed through here)."""
        return self.embed_tokens(input_ids)

    def layer_window(self, index: int) -> int | None:
        """The keys layer `index`'s tokens see: their last `sliding_window`, or all."""
        return self.config.sliding_window

    def layer_rotates_locally(self, index: int) -> bool:
        """Whether layer `index` rotates with `local_rotary` (none of LLaMA's do)."""
        return False

    @property
    def attention_backend(self) -> str:
        """How this model's attention runs: "sdpa" on CUDA (torch's fused kernel),
        "native" where lamina's CPU kernels were built for it, else "bmm" (see
        attention.py)."""
        if self.device.type == "cuda":
            return "sdpa"
        return "native" if self.native is not None else "bmm"

    @property
    def splits_rows_by_kind(self) -> bool:
        """Whether prompt and generated tokens take different matmul kernels, so the
        caller must pass RowKinds (fp16 weights on the CPU)."""
        return self.lm_head.prompt_kernel is not None

    def compute_logits(self, hidden: torch.Tensor, kinds: RowKinds | None = None) -> torch.Tensor:
        """[S, hidden] -> [S, vocab]; call it only on the rows that sample. kinds: of
        those S rows (the token each row was computed for)."""
        return self.lm_head(hidden, kinds)


def _llama_features(raw: dict[str, Any]) -> dict[str, Any]:
    """LLaMA's switches are its own config fields (attention_bias, mlp_bias): read by
    ModelConfig.from_dict already."""
    return {}


FAMILY = Family("LlamaForCausalLM", LlamaForCausalLM, _llama_features)
