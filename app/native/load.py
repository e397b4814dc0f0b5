"""`native_kernels()`: the compiled kernels for this machine, built on first use and
checked against torch before they serve (self_check.py), or None."""

from __future__ import annotations

import functools
import logging
import time

from app.native.build import NativeBuildError, build_library
from app.native.kernels import NativeKernels
from app.native.self_check import check_library

logger = logging.getLogger("app.native")


@functools.lru_cache(maxsize=1)
def native_kernels() -> NativeKernels | None:
    """The compiled kernels for this machine (built on first call), or None if unavailable.
    The log says which ran: the instruction-set level, the compiler or why a prebuilt
    library, or why torch's kernels serve instead."""
    started = time.perf_counter()
    try:
        kernels = NativeKernels(build_library())
        check_library(kernels)
    except (NativeBuildError, OSError, AssertionError) as exc:
        logger.warning("native kernels unavailable (%s): using torch's kernels", exc)
        return None
    runtime = "its own OpenMP runtime" if kernels.own_openmp else "torch's OpenMP threads"
    bf16 = "AVX512-BF16 dot products" if kernels.bf16_dot_product else "widened to fp32 FMAs"
    logger.info(
        "native kernels ready: %s, on %s (%.1f s); bf16 weights: %s",
        kernels.build.describe(),
        runtime,
        time.perf_counter() - started,
        bf16,
    )
    return kernels
