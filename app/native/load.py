"""`native_kernels()`: the compiled kernels for this machine, built on first use and
checked against torch before they serve (self_check.py), or None."""

from __future__ import annotations

import functools
import logging
import time

from app.native.build import NativeBuildError, build_library
from app.native.kernels import NativeKernels
from app.native.self_check import check_amx_tiles, check_library

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
    if amx_mismatch := check_amx_tiles(kernels):
        logger.warning("AMX tiles turned off: %s", amx_mismatch)
    runtime = "its own OpenMP runtime" if kernels.own_openmp else "torch's OpenMP threads"
    bf16 = "AVX512-BF16 dot products" if kernels.bf16_dot_product else "widened to fp32 FMAs"
    if kernels.amx_bf16 and kernels.amx_status == "in use":
        bf16 = "AMX tiles (TDPBF16PS), every row"
    logger.info(
        "native kernels ready: %s, on %s (%.1f s); bf16 weights: %s; AMX tiles: %s",
        kernels.build.describe(),
        runtime,
        time.perf_counter() - started,
        bf16,
        AMX_LOG[kernels.amx_status],
    )
    return kernels


# What the start-up line says of AMX tiles (amx.h), by NativeKernels.amx_status.
AMX_LOG = {
    "in use": "int8 and 4-bit matmul rows in 16s (the rest on VNNI)",
    "turned off": "off (int8 and 4-bit on VNNI, bf16 on AVX512-BF16)",
    "refused": "refused by the OS (arch_prctl XTILEDATA; int8 and 4-bit on VNNI)",
    "not built": "none in this build (no AMX-INT8 on this CPU or in its target)",
}
