"""The input embedding, kept in the narrowest storage that holds the checkpoint's values
exactly; the rows a step gathers are upcast to the model dtype.

- A bf16 or fp16 checkpoint's matrix stays bf16/fp16 under an fp32 model: every value is
  exact in fp32, so a gathered row upcast is the row the old fp32 matrix held, bit for
  bit, in half the memory (1 GiB instead of 2 for an 8B Llama 3's 128k x 4096).
- A GGUF file's Q8_0 matrix stays in its blocks (Q8_0Embedding): int8 times an fp16 scale
  (8 by 11 significant bits) is exact in fp32, the value the `gguf` package's dequantize
  gives (31 MB instead of 108 MiB for the default model's file).
- A tied head's fp32 panels (or torch weight) hold the matrix exactly: the embedding is
  read from them instead (PanelEmbedding), one copy, not two.

Nothing is quantized here: a matrix is stored as the file has it, or at the model dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Q8_0_BLOCK = 32  # weights per Q8_0 block: one fp16 scale, 32 int8
_FP16_BYTES = 2
_ROWS_PER_SLICE = 4096  # of a Q8_0 matrix dequantized for a tied head


def stored_dtype(file_dtype: torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The checkpoint's dtype where the model dtype holds its every value (bf16 or fp16
    under fp32), else the model dtype (as the rest of the model is converted)."""
    if model_dtype == torch.float32 and file_dtype in (torch.bfloat16, torch.float16):
        return file_dtype
    return model_dtype


def _same_rows(copy: torch.dtype, stored: torch.dtype, out: torch.dtype) -> bool:
    """Whether a copy of the matrix converted to dtype `copy` gives the rows an embedding
    stored as `stored` serves at `out`: fp32 and `stored` hold the values exactly, and
    `out` rounds them once, as the lookup does."""
    return copy in (torch.float32, stored, out)


class TokenEmbedding(nn.Module):
    """Rows of `weight` ([vocab, hidden], stored as the checkpoint has it), at the model
    dtype. Build on the meta device; the loader assigns the weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        # Uninitialised (the checkpoint replaces it): nn.Embedding's random init on the
        # meta device imports torch._dynamo, a second of every start-up.
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim), requires_grad=False
        )  # [vocab, hidden]
        self.out_dtype = torch.float32  # the model dtype (finish)
        # Set for a GGUF file's Q8_0 matrix (use_files_q8_0_embedding): its blocks, read
        # at finish instead of a dequantized copy.
        self.file_q8_0: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def over(cls, matrix: torch.Tensor, out_dtype: torch.dtype) -> TokenEmbedding:
        """An embedding reading the rows of `matrix` [vocab, hidden] (a tied head's)."""
        embedding = cls.__new__(cls)
        nn.Module.__init__(embedding)
        if not isinstance(matrix, nn.Parameter):  # a kernel's copy
            matrix = nn.Parameter(matrix, requires_grad=False)
        embedding.weight = matrix
        embedding.out_dtype, embedding.file_q8_0 = out_dtype, None
        return embedding

    def finish(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The embedding to serve at model dtype `dtype`: this one, or the file's Q8_0
        blocks (on `device`) where the loader left the weight in the file."""
        self.out_dtype = dtype
        if self.file_q8_0 is None:
            return self
        q, scales = self.file_q8_0()
        return Q8_0Embedding(q.to(device), scales.to(device), dtype)

    def same_rows_from(self, dtype: torch.dtype) -> bool:
        """Whether a copy of the matrix converted to `dtype` serves the same rows."""
        return _same_rows(dtype, self.weight.dtype, self.out_dtype)

    def tied_weight(self) -> torch.Tensor:
        """The matrix a tied head packs: the stored one (the kernels convert it)."""
        return self.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [N] int64 -> [N, hidden]
        return F.embedding(input_ids, self.weight).to(self.out_dtype)


class Q8_0Embedding(nn.Module):
    """A GGUF file's Q8_0 matrix in its blocks: row t, weights 32 j .. 32 j + 31 are
    q[t, 32 j + i] * scales[t, j], computed in fp32 (exact, as the `gguf` package does)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.q = nn.Parameter(q, requires_grad=False)  # [vocab, hidden] int8
        self.scales = nn.Parameter(scales, requires_grad=False)  # [vocab, hidden / 32] fp16
        self.out_dtype = out_dtype

    def same_rows_from(self, dtype: torch.dtype) -> bool:
        """Whether a copy of the matrix converted to `dtype` serves the same rows (the
        blocks' values need fp32's 24 significant bits)."""
        return _same_rows(dtype, torch.float32, self.out_dtype)

    def tied_weight(self) -> torch.Tensor:
        """The whole matrix dequantized at the model dtype, for a tied head to pack, a
        slice of rows at a time: the whole of it at once would hold two fp32 copies."""
        vocab, hidden = self.q.shape
        matrix = torch.empty(vocab, hidden, dtype=self.out_dtype, device=self.q.device)
        for start in range(0, vocab, _ROWS_PER_SLICE):
            ids = torch.arange(start, min(start + _ROWS_PER_SLICE, vocab), device=self.q.device)
            matrix[start : start + len(ids)] = self(ids)
        return matrix  # [vocab, hidden]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [N] int64 -> [N, hidden]
        q = self.q[input_ids].float()  # [N, hidden]
        scales = self.scales[input_ids].float()  # [N, hidden / 32]
        values = q.view(*scales.shape, Q8_0_BLOCK) * scales.unsqueeze(-1)
        return values.view(q.shape).to(self.out_dtype)


class PanelEmbedding(nn.Module):
    """The input embedding of a tied head, read from the head's fp32 panels.

    A tied head's weight is the embedding matrix; once the native kernel has packed it
    into panels ([ceil(vocab / 64), hidden, 64], token t in column t % 64 of panel
    t // 64), keeping the matrix as well would hold the same numbers twice (113 MB for
    SmolLM2-135M). Gathering a token's row across its panel copies the same bits.
    """

    def __init__(self, panels: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.panels = panels  # [ceil(vocab / 64), hidden, 64] fp32, shared with lm_head
        self.columns = panels.shape[2]
        self.out_dtype = out_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [N] int64 -> [N, hidden]
        rows = self.panels[input_ids // self.columns, :, input_ids % self.columns]
        return rows.to(self.out_dtype)


def use_files_q8_0_embedding(
    model: nn.Module, gguf_path: Path, table: list[dict[str, Any]]
) -> frozenset[str]:
    """Before a GGUF folder's model loads (`table`: its gguf_tensors.json): where the file
    stores the embedding as Q8_0, have it served from those blocks. Returns the
    transformers names the loader need not dequantize."""
    (entry,) = [e for e in table if e["name"] == "token_embd.weight"]
    if entry["type"] != "Q8_0":
        return frozenset()
    model.embed_tokens.file_q8_0 = partial(_read_q8_0_file, gguf_path, entry)
    return frozenset({"model.embed_tokens.weight"})


def _read_q8_0_file(path: Path, entry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from app.model.gguf import _read

    with open(path, "rb") as file:
        raw = _read(file, entry)
    return read_q8_0(raw, entry["shape"][1])  # ggml lists [hidden, vocab]


def read_q8_0(raw: np.ndarray, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor's bytes -> q [rows, K] int8 and scales [rows, K / 32] fp16."""
    blocks = raw.reshape(num_rows, -1, _FP16_BYTES + Q8_0_BLOCK)  # d, then 32 int8
    scales = np.ascontiguousarray(blocks[..., :_FP16_BYTES]).view(np.float16)[..., 0]
    q = np.ascontiguousarray(blocks[..., _FP16_BYTES:]).view(np.int8).reshape(num_rows, -1)
    return torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(scales))
