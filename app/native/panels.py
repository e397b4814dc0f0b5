"""How the native matmul's packed weights are laid out (matmul.h, bf16.h): shared by the
kernels' entry points and the decoder stack's descriptions."""

from __future__ import annotations

import torch

PANEL_COLUMNS = 64  # columns per packed weight panel (vector.h: PANEL)
# How panels are stored, as the C side numbers it (matmul.h: WEIGHTS_F32, _F16, _BF16).
WEIGHT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def panel_shape(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[int, ...]:
    """[ceil(N / 64), K, 64] (fp32, fp16), or [ceil(N / 64), ceil(K / 2), 64, 2] for bf16:
    a column's weights for k = 2j and 2j + 1 side by side (K-pairs)."""
    num_panels = -(-out_features // PANEL_COLUMNS)
    if dtype == torch.bfloat16:
        return (num_panels, -(-in_features // 2), PANEL_COLUMNS, 2)
    return (num_panels, in_features, PANEL_COLUMNS)


def panels_fit(panels: torch.Tensor, in_features: int) -> bool:
    """Whether packed panels take inputs of in_features."""
    expected = panel_shape(panels.shape[0] * PANEL_COLUMNS, in_features, panels.dtype)
    return tuple(panels.shape[1:]) == expected[1:]
