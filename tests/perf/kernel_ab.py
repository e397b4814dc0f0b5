"""A/B of two kernel libraries in one process: the int8 and 4-bit (or bf16, fp16, fp32)
matmuls of one forward of the default model's shapes (every layer's qkv, o, gate_up, down,
then the head), each library packing its own panels, interleaved, best of --repeats; fp32
of the current library beside them. For a kernel change, build the previous source's
library first (`git stash; python -m app.native.build; git stash pop`: the path it prints)
and pass it.

Where the new library has AMX tiles in use (amx.h), it also runs with them turned off
("vnni"; for bf16, AVX512-BF16's VDPBF16PS), so "amx over vnni" is AMX's own gain,
measured in the same library.

Run: `.venv/bin/python -m tests.perf.kernel_ab OLD.so [--rows 1,8,32] [--threads 1]
[--dtypes int8,int4,bf16,fp16,fp32]`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from app.native import NativeKernels
from app.native.build import Build, build_library
from app.native.panels import INT4

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152  # SmolLM2-135M
SHAPES = [(HIDDEN, 960), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
SHAPES = SHAPES * LAYERS + [(HIDDEN, VOCAB)]  # (in, out) of each matmul
DTYPES = {
    "int8": torch.int8,
    "int4": INT4,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
AMX_DTYPES = {"int8", "int4", "bf16"}  # the ones that take AMX tiles where in use


def forward_ms(kernels: NativeKernels, panels: list[torch.Tensor], xs: dict) -> float:
    started = time.perf_counter()
    for (in_features, out_features), packed in zip(SHAPES, panels):
        kernels.matmul(xs[in_features], packed, None, out_features)
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the previous kernels library (.so)")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="int8,int4", help=f"of {', '.join(DTYPES)}")
    args = parser.parse_args()
    dtypes = {name: DTYPES[name] for name in args.dtypes.split(",")}
    torch.set_num_threads(args.threads)
    libraries = {"old": NativeKernels(Build(args.old, "native", "given")), "new": None}
    libraries["new"] = NativeKernels(build_library())
    weights = [torch.randn(n, k, generator=torch.Generator().manual_seed(i)) * 0.02
               for i, (k, n) in enumerate(SHAPES)]  # fmt: skip
    variants = {
        (name, which): (kernels, [kernels.pack_weight(w, dtype=dtype) for w in weights])
        for name, dtype in dtypes.items()
        for which, kernels in libraries.items()
    }
    new = libraries["new"]
    with_amx = new.amx_status == "in use"
    if with_amx:  # the same panels, AMX turned off around each forward
        variants |= {(name, "vnni"): variants[(name, "new")] for name in AMX_DTYPES & set(dtypes)}
    if "fp32" not in dtypes:  # the current library's fp32 beside the others, for scale
        variants[("fp32", "new")] = (new, [new.pack_weight(w) for w in weights])
    del weights
    print(f"{len(SHAPES)} matmuls, {args.threads} threads, best of {args.repeats}, ms")
    for rows in map(int, args.rows.split(",")):
        xs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.repeats):
            for key, (kernels, panels) in variants.items():
                new.use_amx(key[1] != "vnni")
                best[key] = min(best[key], forward_ms(kernels, panels, xs))
        new.use_amx(True)
        cells = "  ".join(f"{name} {which} {ms:.2f}" for (name, which), ms in best.items())
        speedups = "  ".join(
            f"{name} {best[(name, 'old')] / best[(name, 'new')]:.2f}x" for name in dtypes
        )
        if with_amx and AMX_DTYPES & set(dtypes):
            speedups += " | amx over vnni: " + "  ".join(
                f"{name} {best[(name, 'vnni')] / best[(name, 'new')]:.2f}x"
                for name in dtypes
                if name in AMX_DTYPES
            )
        print(f"rows {rows:4d}: {cells}  | new over old: {speedups}", flush=True)


if __name__ == "__main__":
    main()
