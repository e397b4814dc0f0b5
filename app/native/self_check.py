"""A miscompiled or mismatched library must not serve: `check_library` compares every
entry point with torch once, at load, on small shapes that take every code path (odd
sizes, a tile of prompt tokens, GQA, a reversed block table, a tail of SiLU lanes).
Raises AssertionError on any disagreement; native_kernels() then falls back to torch's
kernels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from app.native.panels import INT4, weight_kind_name
from app.native.stack import DecoderLayerWeights, PackedLinear, StackShape, describe_stack

if TYPE_CHECKING:
    from app.native.kernels import NativeKernels

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def check_library(kernels: NativeKernels) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=generator)
    weight = torch.randn(70, 40, generator=generator)
    got = kernels.matmul(x, kernels.pack_weight(weight), None, 70)
    if not torch.allclose(got, x @ weight.T, **TOLERANCE):
        raise AssertionError("the native matmul disagrees with torch")
    _check_bf16_matmul(kernels, generator)
    _check_attention(kernels, generator)
    _check_decoder_stack(kernels, generator)


def check_amx_tiles(kernels: NativeKernels) -> str:
    """Where AMX tiles are in use (amx.h): int8 and 4-bit matmuls of 21 rows (a 16-row AMX
    tile and 5 rows of VNNI tiles; 3 panels, one a part) must give the bits they give
    without them; bf16 ones (where on AMX) each row's bits alone, close to fp64. On a
    mismatch AMX is turned off; returns why (else "")."""
    if kernels.amx_status != "in use":
        return ""
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(21, 96, generator=generator), torch.randn(150, 96, generator=generator)
    for dtype in (torch.int8, INT4):
        panels = kernels.pack_weight(weight, dtype=dtype)
        kernels.use_amx(True)
        tiled = kernels.matmul(x, panels, None, 150)
        kernels.use_amx(False)
        if not torch.equal(tiled, kernels.matmul(x, panels, None, 150)):
            return f"their {weight_kind_name(dtype)} bits differed from the VNNI tiles' at start-up"
    kernels.use_amx(True)
    if kernels.amx_bf16 and (why := _check_amx_bf16(kernels, x[:, :75], weight[:, :75])):
        kernels.use_amx(False)
        return why
    return ""


def _check_amx_bf16(kernels: NativeKernels, x: torch.Tensor, weight: torch.Tensor) -> str:
    """bf16 on AMX tiles takes every row (no VDPBF16PS bits to match): 21 rows of 75
    features (4 whole chunks of 16 K-pairs and a part) must give each row the bits it has
    alone, and be close to fp64's product of the rounded inputs."""
    panels = kernels.pack_weight(weight, dtype=torch.bfloat16)
    tiled = kernels.matmul(x, panels, None, weight.shape[0])
    alone = torch.cat([kernels.matmul(row[None], panels, None, weight.shape[0]) for row in x])
    if not torch.equal(tiled, alone):
        return "their bf16 bits for a row depended on the row count at start-up"
    expected = x.bfloat16().double() @ weight.bfloat16().double().T
    if not torch.allclose(tiled.double(), expected, **TOLERANCE):
        return "their bf16 matmul disagreed with fp64 at start-up"
    return ""


def dense_causal_attention(
    query: torch.Tensor,  # [T, heads, D]: the tokens at positions first_position..
    keys: torch.Tensor,  # [S, kv_heads, D]: keys at positions 0..S-1
    values: torch.Tensor,  # [S, kv_heads, D]
    first_position: int = 0,
    scale: float | None = None,  # default 1 / sqrt(D)
) -> torch.Tensor:  # [T, heads, D]
    """Plain causal attention with grouped KV heads, the reference the native kernels
    are checked against (here at load, and by the tests in fp64)."""
    tokens, heads, dim = query.shape
    group = heads // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)  # [S, heads, D]
    v = values.repeat_interleave(group, dim=1)
    scale = dim**-0.5 if scale is None else scale
    scores = torch.einsum("thd,shd->hts", query, k) * scale
    positions = torch.arange(first_position, first_position + tokens)[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > positions, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def _check_bf16_matmul(kernels: NativeKernels, generator: torch.Generator) -> None:
    """bf16 panels (an odd K: a half-empty last pair) against the product of the inputs
    rounded to bf16, which the kernel sums exactly but for fp32 rounding."""
    x, weight = torch.randn(7, 41, generator=generator), torch.randn(70, 41, generator=generator)
    got = kernels.matmul(x, kernels.pack_weight(weight, dtype=torch.bfloat16), None, 70)
    expected = x.bfloat16().double() @ weight.bfloat16().double().T
    if not torch.allclose(got.double(), expected, **TOLERANCE):
        raise AssertionError("the native bf16 matmul disagrees with torch")


def _check_attention(kernels: NativeKernels, generator: torch.Generator) -> None:
    tokens, heads, kv_heads, dim = 21, 4, 2, 16  # one sequence, blocks of 8, reversed table
    keys = torch.randn(kv_heads, 3, 8, dim, generator=generator)
    values = torch.randn(kv_heads, 3, 8, dim, generator=generator)
    query = torch.randn(tokens, heads, dim, generator=generator)
    table = torch.tensor([[2, 1, 0]], dtype=torch.int32)
    got = kernels.paged_attention(
        query, keys, values, table, torch.zeros(tokens, dtype=torch.int32),
        torch.arange(1, tokens + 1, dtype=torch.int32), dim**-0.5,
    )  # fmt: skip
    # The same keys in order: [tokens, kv_heads, dim].
    ordered_k = keys[:, [2, 1, 0]].reshape(kv_heads, 24, dim)[:, :tokens].transpose(0, 1)
    ordered_v = values[:, [2, 1, 0]].reshape(kv_heads, 24, dim)[:, :tokens].transpose(0, 1)
    expected = dense_causal_attention(query, ordered_k, ordered_v).reshape(tokens, -1)
    if not torch.allclose(got, expected, **TOLERANCE):
        raise AssertionError("the native attention disagrees with torch")


def _check_decoder_stack(kernels: NativeKernels, generator: torch.Generator) -> None:
    """One LLaMA layer over a 5-token prompt, in blocks of 4 with a reversed table,
    against the same layer written with torch's ops."""
    tokens, hidden, heads, kv_heads, dim, inter = 5, 32, 2, 1, 16, 40

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.3

    weights = {"qkv": randn((heads + 2 * kv_heads) * dim, hidden), "o": randn(hidden, heads * dim)}
    weights |= {"gate_up": randn(2 * inter, hidden), "down": randn(hidden, inter)}
    norms = (1 + randn(hidden), 1 + randn(hidden))
    cache = torch.zeros(2, kv_heads, 2, 4, dim)  # [keys/values, kv_heads, blocks, 4, dim]
    packed = {
        name: PackedLinear(panels, panels, None, w.shape[1], w.shape[0])
        for name, w in weights.items()
        for panels in [kernels.pack_weight(w)]
    }
    layer = DecoderLayerWeights(*norms, **packed, keys=cache[0], values=cache[1])
    stack = describe_stack([layer], StackShape(heads, kv_heads, dim, inter, 1e-5, dim**-0.5))
    x, cos, sin = randn(tokens, hidden), randn(tokens, dim), randn(tokens, dim)
    slots = torch.tensor([4, 5, 6, 7, 0])  # positions 0-3 in block 1, position 4 in block 0
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    got = x.clone()
    kernels.decoder_stack(
        stack, got, tokens, cos, sin, slots, table, torch.zeros(tokens, dtype=torch.int32),
        torch.arange(1, tokens + 1, dtype=torch.int32),
    )  # fmt: skip
    if not torch.allclose(got, _reference_layer(x, weights, norms, cos, sin, heads), **TOLERANCE):
        raise AssertionError("the native decoder stack disagrees with torch")


def _reference_layer(x, weights, norms, cos, sin, heads: int) -> torch.Tensor:
    """[T, hidden] -> [T, hidden]: one LLaMA layer (rotary from the given rows)."""
    tokens, dim = x.shape[0], cos.shape[1]
    qkv = F.rms_norm(x, (x.shape[1],), norms[0], 1e-5) @ weights["qkv"].T
    heads_all = qkv.view(tokens, -1, dim)  # [T, heads + 2 kv_heads, D]
    q_and_k = heads_all[:, : heads + (heads_all.shape[1] - heads) // 2]
    half = dim // 2
    swapped = torch.cat((q_and_k[..., half:], q_and_k[..., :half]), dim=-1)
    rotated = q_and_k * cos[:, None] + swapped * sin[:, None]
    query, keys = rotated[:, :heads], rotated[:, heads:]
    values = heads_all[:, q_and_k.shape[1] :]
    x = x + dense_causal_attention(query, keys, values).reshape(tokens, -1) @ weights["o"].T
    gate, up = (F.rms_norm(x, (x.shape[1],), norms[1], 1e-5) @ weights["gate_up"].T).chunk(2, -1)
    return x + (F.silu(gate) * up) @ weights["down"].T
