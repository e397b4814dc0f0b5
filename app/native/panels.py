"""How the native matmul's packed weights are laid out (matmul.h, bf16.h): shared by the
kernels' entry points and the decoder stack's descriptions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

PANEL_COLUMNS = 64  # columns per packed weight panel (vector.h: PANEL)
# 4-bit blocks are bytes: panels of torch.uint8 hold 4-bit weights (int4.h)
INT4 = torch.uint8
# How panels are stored, as the C side numbers it (matmul.h: WEIGHTS_F32, _F16, _BF16, _I8,
# _I4), by the panels tensor's dtype.
WEIGHT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3, INT4: 4}
INT8_BLOCK = 32  # k per int8 or 4-bit block (int8.h: I8_BLOCK)
INT8_BLOCK_BYTES = INT8_BLOCK * PANEL_COLUMNS + PANEL_COLUMNS * 4  # weights, then fp32 scales
# 4-bit: the nibbles, then fp32 scales and minima
INT4_BLOCK_BYTES = INT8_BLOCK * PANEL_COLUMNS // 2 + 2 * PANEL_COLUMNS * 4
BLOCK_BYTES = {torch.int8: INT8_BLOCK_BYTES, INT4: INT4_BLOCK_BYTES}


def weight_kind_name(dtype: torch.dtype) -> str:
    """How panels of `dtype` store weights, in the settings' words (int4 for bytes)."""
    return "int4" if dtype == INT4 else str(dtype).removeprefix("torch.")


def panel_shape(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[int, ...]:
    """[ceil(N / 64), K, 64] (fp32, fp16), or [ceil(N / 64), ceil(K / 2), 64, 2] for bf16:
    a column's weights for k = 2j and 2j + 1 side by side (K-pairs), or for int8
    [ceil(N / 64), K / 32, 2304] bytes: per block of 32 k, 32 x 64 weights then 64 fp32
    scales (int8.h's quad layout), and for 4-bit (INT4) [ceil(N / 64), K / 32, 1536]:
    1,024 bytes of nibble pairs, 64 scales, 64 minima (int4.h) (K must be a multiple of
    32: fits_blocks)."""
    num_panels = -(-out_features // PANEL_COLUMNS)
    if dtype in BLOCK_BYTES:
        if not fits_blocks(in_features):
            raise ValueError(f"int8 and int4 panels need in_features divisible by {INT8_BLOCK}")
        return (num_panels, in_features // INT8_BLOCK, BLOCK_BYTES[dtype])
    if dtype == torch.bfloat16:
        return (num_panels, -(-in_features // 2), PANEL_COLUMNS, 2)
    return (num_panels, in_features, PANEL_COLUMNS)


def fits_blocks(in_features: int) -> bool:
    """Whether a layer of in_features inputs can have int8 or 4-bit panels (whole blocks
    of k)."""
    return in_features % INT8_BLOCK == 0


def panels_fit(panels: torch.Tensor, in_features: int) -> bool:
    """Whether packed panels take inputs of in_features."""
    if panels.dtype in BLOCK_BYTES and not fits_blocks(in_features):
        return False
    expected = panel_shape(panels.shape[0] * PANEL_COLUMNS, in_features, panels.dtype)
    return tuple(panels.shape[1:]) == expected[1:]


def dequantize_int8(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """int8 panels -> the fp32 weight [N, K] the kernel multiplies by: each int8 weight
    times its column's block scale, rounded to fp32 as the kernel rounds it."""
    num_panels, num_blocks, _ = panels.shape
    weights = INT8_BLOCK * PANEL_COLUMNS
    stored = panels[:, :, :weights].contiguous().view(torch.uint8)  # q + 128
    quads = stored.reshape(num_panels, num_blocks, INT8_BLOCK // 4, PANEL_COLUMNS, 4)
    q = quads.transpose(3, 4).reshape(num_panels, num_blocks, INT8_BLOCK, PANEL_COLUMNS)
    scales = panels[:, :, weights:].contiguous().view(torch.float32)  # [P, B, 64]
    return _block_columns((q.float() - 128) * scales.unsqueeze(2), out_features)


@dataclass(frozen=True)
class Int4Blocks:
    """4-bit weights as int4 panels hold them, by column rather than packed: each column's
    weights for 32 consecutive k are q * scale + minimum (int4.h)."""

    q: torch.Tensor  # [N, K] uint8, each in [0, 15]
    scales: torch.Tensor  # [N, K / 32] fp32
    minima: torch.Tensor  # [N, K / 32] fp32

    def values(self) -> torch.Tensor:  # [N, K] fp32
        """q * scale + minimum with one rounding (the kernel's FMA; here in fp64)."""
        scales = self.scales.double().repeat_interleave(INT8_BLOCK, dim=1)
        minima = self.minima.double().repeat_interleave(INT8_BLOCK, dim=1)
        return (self.q.double() * scales + minima).float()

    @staticmethod
    def cat(parts: Sequence[Int4Blocks]) -> Int4Blocks:
        """The parts' rows one after another (q, k, v merged into one projection)."""
        fields = ([p.q for p in parts], [p.scales for p in parts], [p.minima for p in parts])
        # numpy: torch.cat of these took 10x longer at load
        return Int4Blocks(
            *(torch.from_numpy(np.concatenate([t.numpy() for t in f])) for f in fields)
        )


def pack_int4(
    blocks: Int4Blocks, allocate: Callable[..., torch.Tensor] = torch.empty
) -> torch.Tensor:
    """Int4Blocks [N, K] -> 4-bit panels [ceil(N / 64), K / 32, 1536] as the native packer
    lays them out (int4.h: byte (p, c, i) of a block holds q[8p + i][c] in its low nibble
    and q[8p + 4 + i][c] in its high one; then 64 scales and 64 minima), zero columns past
    N. The inverse of unpack_int4: the weights stay what they are, nothing is rounded.
    (In numpy: torch's strided uint8 copies took 20x longer.)"""
    out_features, in_features = blocks.q.shape
    if not fits_blocks(in_features):
        raise ValueError(f"4-bit panels need in_features divisible by {INT8_BLOCK}")
    num_panels, num_blocks = -(-out_features // PANEL_COLUMNS), in_features // INT8_BLOCK
    columns = num_panels * PANEL_COLUMNS  # zero columns fill the last panel

    def padded(per_column: torch.Tensor) -> np.ndarray:  # [N, ...] -> [columns, ...]
        out = np.zeros((columns, *per_column.shape[1:]), per_column.numpy().dtype)
        out[:out_features] = per_column.numpy()
        return out

    # k = 8p + 4h + i: [column, block, p, h, i] -> bytes [column, block, p, i]
    q = padded(blocks.q).reshape(columns, num_blocks, INT8_BLOCK // 8, 2, 4)
    pairs = q[:, :, :, 0] | (q[:, :, :, 1] << 4)
    # -> [panel, block, p, column in panel, i]
    quads = pairs.reshape(num_panels, PANEL_COLUMNS, num_blocks, INT8_BLOCK // 8, 4)
    panels = allocate(panel_shape(out_features, in_features, INT4), dtype=INT4)
    out = panels.numpy()
    nibble_bytes = INT8_BLOCK * PANEL_COLUMNS // 2
    out[:, :, :nibble_bytes] = quads.transpose(0, 2, 3, 1, 4).reshape(num_panels, num_blocks, -1)
    tail = out[:, :, nibble_bytes:].view(np.float32)  # [P, B, 128]: scales, then minima
    for offset, per_column in ((0, blocks.scales), (PANEL_COLUMNS, blocks.minima)):
        by_block = padded(per_column.float()).reshape(num_panels, PANEL_COLUMNS, num_blocks)
        tail[:, :, offset : offset + PANEL_COLUMNS] = by_block.transpose(0, 2, 1)
    return panels


def unpack_int4(panels: torch.Tensor, out_features: int) -> Int4Blocks:
    """4-bit panels -> the blocks they hold, by column [N, K] (pack_int4's inverse)."""
    num_panels, num_blocks, _ = panels.shape
    nibble_bytes = INT8_BLOCK * PANEL_COLUMNS // 2
    quad_pairs = INT8_BLOCK // 8  # byte (p, c, i): k = 8p + i low, 8p + 4 + i high
    pairs = panels[:, :, :nibble_bytes].reshape(num_panels, num_blocks, quad_pairs, -1, 4)
    halves = [(pairs & 15).transpose(3, 4), (pairs >> 4).transpose(3, 4)]  # [P, B, 4, 4, 64]
    q = torch.stack(halves, dim=3).reshape(num_panels, num_blocks, INT8_BLOCK, -1)
    tail = panels[:, :, nibble_bytes:].contiguous().view(torch.float32)  # [P, B, 128]

    def by_column(per_block: torch.Tensor) -> torch.Tensor:  # [P, B, 64] -> [N, B]
        return per_block.transpose(1, 2).reshape(-1, num_blocks)[:out_features]

    return Int4Blocks(
        _block_columns(q, out_features).contiguous(),
        by_column(tail[..., :PANEL_COLUMNS]).contiguous(),
        by_column(tail[..., PANEL_COLUMNS:]).contiguous(),
    )


def dequantize_int4(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """4-bit panels -> the fp32 weight [N, K] the kernel multiplies by: q * scale +
    minimum per column and block, with one rounding (the kernel's FMA; here in fp64)."""
    return unpack_int4(panels, out_features).values()


def quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 (K a multiple of 32) -> [M, K] fp64: the rows as the int8 and 4-bit
    matmuls multiply them (int8.h): per row and block of 32, scale = largest |x| / 127,
    each value round(x * (1 / scale)) (to nearest even, in [-127, 127]) times scale."""
    blocks = x.reshape(x.shape[0], -1, INT8_BLOCK)  # [M, K / 32, 32]
    scale = blocks.abs().amax(-1, keepdim=True) / 127  # fp32, as the kernel divides
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(blocks * inverse).clamp(-127, 127)
    return (q.double() * scale.double()).reshape(x.shape)


def _block_columns(dequantized: torch.Tensor, out_features: int) -> torch.Tensor:
    """[P, B, 32, 64] weights by panel, block, k and column -> the weight [N, K]."""
    num_panels = dequantized.shape[0]
    columns = dequantized.permute(0, 3, 1, 2).reshape(num_panels * PANEL_COLUMNS, -1)
    return columns[:out_features]
