"""How the native matmul's packed weights are laid out (matmul.h, bf16.h): shared by the
kernels' entry points and the decoder stack's descriptions."""

from __future__ import annotations

import torch

PANEL_COLUMNS = 64  # columns per packed weight panel (vector.h: PANEL)
# How panels are stored, as the C side numbers it (matmul.h: WEIGHTS_F32, _F16, _BF16, _I8).
WEIGHT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
INT8_BLOCK = 32  # k per int8 scale (int8.h: I8_BLOCK)
INT8_BLOCK_BYTES = INT8_BLOCK * PANEL_COLUMNS + PANEL_COLUMNS * 4  # weights, then fp32 scales


def panel_shape(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[int, ...]:
    """[ceil(N / 64), K, 64] (fp32, fp16), or [ceil(N / 64), ceil(K / 2), 64, 2] for bf16:
    a column's weights for k = 2j and 2j + 1 side by side (K-pairs), or for int8
    [ceil(N / 64), K / 32, 2304] bytes: per block of 32 k, 32 x 64 weights then 64 fp32
    scales (K must be a multiple of 32: int8_fits)."""
    num_panels = -(-out_features // PANEL_COLUMNS)
    if dtype == torch.int8:
        if not int8_fits(in_features):
            raise ValueError(f"int8 panels need in_features divisible by {INT8_BLOCK}")
        return (num_panels, in_features // INT8_BLOCK, INT8_BLOCK_BYTES)
    if dtype == torch.bfloat16:
        return (num_panels, -(-in_features // 2), PANEL_COLUMNS, 2)
    return (num_panels, in_features, PANEL_COLUMNS)


def int8_fits(in_features: int) -> bool:
    """Whether a layer of in_features inputs can have int8 panels (whole blocks of k)."""
    return in_features % INT8_BLOCK == 0


def panels_fit(panels: torch.Tensor, in_features: int) -> bool:
    """Whether packed panels take inputs of in_features."""
    if panels.dtype == torch.int8 and not int8_fits(in_features):
        return False
    expected = panel_shape(panels.shape[0] * PANEL_COLUMNS, in_features, panels.dtype)
    return tuple(panels.shape[1:]) == expected[1:]


def dequantize_int8(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """int8 panels -> the fp32 weight [N, K] the kernel multiplies by: each int8 weight
    times its column's block scale, rounded to fp32 as the kernel rounds it."""
    num_panels, num_blocks, _ = panels.shape
    weights = INT8_BLOCK * PANEL_COLUMNS
    q = panels[:, :, :weights].reshape(num_panels, num_blocks, INT8_BLOCK, PANEL_COLUMNS)
    scales = panels[:, :, weights:].contiguous().view(torch.float32)  # [P, B, 64]
    dequantized = q.float() * scales.unsqueeze(2)  # [P, B, 32, 64]
    columns = dequantized.permute(0, 3, 1, 2).reshape(num_panels * PANEL_COLUMNS, -1)
    return columns[:out_features]  # [N, K]
