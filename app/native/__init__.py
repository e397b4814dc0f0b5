"""lamina's own CPU kernels: a matmul (fp32 activations; fp32, fp16 or bf16 weights),
paged attention and a decoder-layer stack built from them (stack.py), compiled on first
use.

`native_kernels()` (load.py) returns them, or None where they cannot be had (no C compiler, a
failed build or self-check); the model then uses torch's kernels. Why they exist
(kernels.c and its parts have the details): on a 2-core Zen 4 the matmul reads a single stream's
weights ~40 % faster than oneDNN and is as fast at 32-256 rows, attention reads the KV
blocks in place instead of gathering a copy, and both give every row the same bits
whatever its batch mates, so batch invariance needs no padding.

This file only names the package's public parts; the code lives in its modules
(kernels.py, load.py).
"""

from app.native.kernels import NativeKernels
from app.native.load import native_kernels

__all__ = ["NativeKernels", "native_kernels"]
