"""`lamina bench kernels`: lamina's native CPU kernels against torch's, on the model's shapes.

Matmuls: every Linear of one forward (each layer's fused qkv, o, gate_up and down, then
the head), with distinct weights per layer so they stream from memory as in the model,
through the native kernel, oneDNN with packed weights (torch's fastest fp32 kernel here)
and F.linear, for several row counts. Attention: one decode step of S sequences with C
cached tokens each, all layers, through the native kernel and through torch's path
(gather the blocks, two batched matmuls, key buckets for invariance). bf16 and int8
weights: the same matmuls with bf16 panels and int8 blocks against fp32 panels (of each
library), and bf16 against oneDNN's bf16 matmul (activations cast to bf16, as torch's
path runs them). Variants alternate within each repetition and the best repetition
counts, so a noisy machine hurts both alike; the ratio is the figure to read.

`--isa x86-64-v3,x86-64-v4,x86-64-v4-bf16,native` (and `--compiler gcc|clang`) runs the
matmuls (fp32 and bf16) on each instruction-set build of the kernels, side by side, each
against the FMA peak of its own library.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.config import load_settings
from app.model.attention import (
    build_attention_metadata,
    calibrate_min_query_rows,
    paged_attention,
)
from app.model.config import ModelConfig
from app.model.cpu_threads import default_num_threads
from app.model.families import read_model_config
from app.model.host_memory import HugePageArena
from app.model.kv_cache import KVCache
from app.model.linear import onednn_available
from app.native import NativeKernels, native_kernels
from app.native.build import NATIVE, NativeBuildError, build_level
from app.native.panels import INT4
from app.native.self_check import check_library


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lamina bench kernels", description=__doc__)
    parser.add_argument("--rows", default="1,8,32,128", help="matmul row counts")
    parser.add_argument("--seqs", default="1,32", help="decode sequences for attention")
    parser.add_argument("--context", type=int, default=200, help="cached tokens per sequence")
    parser.add_argument("--prefill", default="512,2048", help="prompt lengths for prefill")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    parser.add_argument("--layers", type=int, help="layers to run (default: the model's)")
    parser.add_argument(
        "--isa",
        help="instruction-set levels of the kernels to compare, comma-separated: native, "
        "x86-64-v4-bf16, x86-64-v4, x86-64-v3 (armv8-a on ARM); default: the library the "
        "server loads",
    )
    parser.add_argument("--compiler", help="compiler for --isa builds (default: cc, gcc, clang)")
    args = parser.parse_args(argv)
    args.isa = [v for v in args.isa.split(",") if v] if args.isa else []
    args.rows = [int(v) for v in args.rows.split(",")]
    args.seqs = [int(v) for v in args.seqs.split(",")]
    args.prefill = [int(v) for v in args.prefill.split(",") if v]
    return args


def best_ms(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each variant, variants interleaved within every repetition."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], (time.perf_counter() - started) * 1e3)
    return best


def linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every matmul of one forward, in order."""
    qkv = config.q_size + 2 * config.kv_size
    layer = [
        (config.hidden_size, qkv),
        (config.q_size, config.hidden_size),
        (config.hidden_size, 2 * config.intermediate_size),
        (config.intermediate_size, config.hidden_size),
    ]
    return layer * config.num_layers + [(config.hidden_size, config.vocab_size)]


@dataclasses.dataclass
class Library:
    """One kernels library in the comparison: its column name and its own FMA peak."""

    name: str
    kernels: NativeKernels
    fma_peak: float  # FLOP/s


def load_libraries(args) -> list[Library]:
    """The libraries to compare: each --isa level (built by --compiler, self-checked), or
    the one the server loads."""
    if not args.isa:
        kernels = native_kernels()
        return [] if kernels is None else [Library(NATIVE, kernels, kernels.fma_peak())]
    libraries = []
    for level in args.isa:
        kernels = NativeKernels(build_level(level, args.compiler))
        check_library(kernels)
        libraries.append(Library(level, kernels, kernels.fma_peak()))
    return libraries


def bench_matmuls(libraries: list[Library], config: ModelConfig, args) -> None:
    shapes = linear_shapes(config)
    weights = [torch.randn(n, k) * 0.02 for k, n in shapes]  # [out, in], as checkpoints
    arena = HugePageArena()  # where the model keeps its panels
    first = libraries[0].kernels  # every level packs the same layout: one copy serves all
    panels = [first.pack_weight(w, arena.empty) for w in weights]
    variants_for: dict[str, Callable[[dict[int, torch.Tensor]], None]] = {
        library.name: lambda xs, kernels=library.kernels: [
            kernels.matmul(xs[k], p, None, n) for (k, n), p in zip(shapes, panels)
        ]
        for library in libraries
    }
    variants_for["F.linear"] = lambda xs: [F.linear(xs[k], w) for (k, _), w in zip(shapes, weights)]
    if onednn_available(torch.float32):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        linear = torch.ops.mkldnn._linear_pointwise.default
        variants_for["oneDNN"] = lambda xs: [
            linear(xs[k], p, None, "none", [], "") for (k, _), p in zip(shapes, packed)
        ]
    print(f"\nmatmuls of one forward ({len(shapes)} matmuls, fp32), best of {args.repeats}, ms")
    names = list(variants_for)
    ours = [library.name for library in libraries]
    print(f"{'rows':>5} " + " ".join(f"{n:>9}" for n in names) + f"  {ours[0]} speed-up")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k in {k for k, _ in shapes}}
        variants = {n: lambda f=f, xs=xs: f(xs) for n, f in variants_for.items()}
        timings = best_ms(variants, args.repeats)
        others = [timings[n] for n in names if n not in ours]
        speedup = min(others) / timings[ours[0]]
        cells = " ".join(f"{timings[n]:9.1f}" for n in names)
        flops = sum(2 * rows * k * n for k, n in shapes)
        shares = "; ".join(
            f"{library.name} {flops / (timings[library.name] / 1e3) / 1e9:.0f} GFLOP/s, "
            f"{flops / (timings[library.name] / 1e3) / library.fma_peak:.0%} of its FMA peak"
            for library in libraries
        )
        print(f"{rows:5d} {cells}  {speedup:.2f}x over the fastest other; {shares}")


LOW_PRECISIONS = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": INT4}  # beside fp32


def bench_low_precision_matmuls(libraries: list[Library], config: ModelConfig, args) -> None:
    """The forward's matmuls with bf16, int8 and 4-bit weights: each library's bf16 panels
    (AVX512-BF16 dot products, or widened in the kernel) and int8 and 4-bit blocks (integer
    dot products with the rows quantized per block: int8.h) beside its fp32 panels, and
    oneDNN in bf16."""
    shapes = linear_shapes(config)
    weights = [torch.randn(n, k) * 0.02 for k, n in shapes]  # [out, in], as checkpoints
    arena = HugePageArena()
    first = libraries[0].kernels  # every level packs the same layouts: one copy serves all
    packed_as = {"fp32": [first.pack_weight(w, arena.empty) for w in weights]}
    for name, dtype in LOW_PRECISIONS.items():
        packed_as[name] = [first.pack_weight(w, arena.empty, dtype=dtype) for w in weights]
    del weights
    # Columns "fp32", "bf16", "int8" for one library; "<level> fp32"... for several.
    prefix = (lambda library: f"{library.name} ") if len(libraries) > 1 else (lambda _: "")
    variants_for: dict[str, Callable[[dict[int, torch.Tensor]], None]] = {}
    for library in libraries:
        for dtype, panels in packed_as.items():
            variants_for[prefix(library) + dtype] = lambda xs, k=library.kernels, p=panels: [
                k.matmul(xs[i], w, None, n) for (i, n), w in zip(shapes, p)
            ]
    if onednn_available(torch.bfloat16):
        packed = [
            torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).bfloat16() * 0.02, None)
            for k, n in shapes
        ]
        linear = torch.ops.mkldnn._linear_pointwise.default
        variants_for["oneDNN bf16"] = lambda xs: [
            linear(xs[k].bfloat16(), p, None, "none", [], "").float()
            for (k, _), p in zip(shapes, packed)
        ]
    hows = ", ".join(
        f"{prefix(library)}bf16 "
        + ("AVX512-BF16 dot products" if library.kernels.bf16_dot_product else "widened to FMAs")
        + f", AMX tiles {library.kernels.amx_status}"
        + (" (bf16 too)" if library.kernels.amx_bf16 else "")
        for library in libraries
    )
    print(
        f"\nmatmuls of one forward with bf16 ({hows}), int8 and int4 weights, "
        f"best of {args.repeats}, ms"
    )
    names = list(variants_for)
    width = max(11, *(len(n) for n in names))
    print(f"{'rows':>5} " + " ".join(f"{n:>{width}}" for n in names) + "  speed-up over fp32")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k in {k for k, _ in shapes}}
        variants = {n: lambda f=f, xs=xs: f(xs) for n, f in variants_for.items()}
        timings = best_ms(variants, args.repeats)
        cells = " ".join(f"{timings[n]:{width}.1f}" for n in names)
        against = []
        for library in libraries:
            fp32_ms = timings[prefix(library) + "fp32"]
            figures = [
                f"{name} {fp32_ms / timings[prefix(library) + name]:.2f}x"
                for name in LOW_PRECISIONS
            ]
            if "oneDNN bf16" in timings:
                bf16_ms = timings[prefix(library) + "bf16"]
                figures.append(f"bf16 {timings['oneDNN bf16'] / bf16_ms:.2f}x over oneDNN bf16")
            against.append(prefix(library) + ", ".join(figures))
        print(f"{rows:5d} {cells}  " + "; ".join(against))


def bench_attention(native: NativeKernels, config: ModelConfig, args) -> None:
    print(
        f"\nattention, all {config.num_layers} layers, best of {args.repeats}, ms\n"
        f"{'step':>28} {'native':>9} {'torch':>9}  native speed-up"
    )
    min_rows = calibrate_min_query_rows(torch.device("cpu"), torch.float32, config.head_dim)
    steps = [(f"decode {n} x {args.context} keys", n, args.context, 1) for n in args.seqs]
    steps += [(f"prefill {t} tokens", 1, 0, t) for t in args.prefill]
    for label, seqs, context, new_tokens in steps:
        step = AttentionStep(config, seqs, context, new_tokens, min_rows)
        variants = {"native": lambda s=step: s.run(native), "torch": lambda s=step: s.run(None)}
        timings = best_ms(variants, args.repeats)
        speedup = timings["torch"] / timings["native"]
        print(f"{label:>28} {timings['native']:9.1f} {timings['torch']:9.1f}  {speedup:.2f}x")


class AttentionStep:
    """One step's attention, every layer: `seqs` sequences with `context` cached tokens
    and `new_tokens` new ones each, in blocks scattered over the cache as a long-running
    server's are."""

    block_size = 16

    def __init__(
        self, config: ModelConfig, seqs: int, context: int, new_tokens: int, min_rows: int
    ) -> None:
        self.config, self.min_rows = config, min_rows
        self.query_lens, self.context_lens = [new_tokens] * seqs, [context] * seqs
        per_seq = -(-(context + new_tokens) // self.block_size)
        num_blocks = seqs * per_seq
        cpu = torch.device("cpu")
        self.cache = KVCache(config, num_blocks, self.block_size, cpu, torch.float32)
        for layer in self.cache.layers:
            layer.normal_()
        order = torch.randperm(num_blocks).tolist()
        self.tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(seqs)]
        num_tokens = seqs * new_tokens
        self.query = torch.randn(num_tokens, config.num_heads, config.head_dim)
        self.new_kv = torch.randn(num_tokens, 2 * config.num_kv_heads, config.head_dim)

    def run(self, native: NativeKernels | None) -> None:
        """native None: torch's path (gather + bmm over key buckets)."""
        _, metadata = build_attention_metadata(
            self.query_lens, self.context_lens, self.tables, self.block_size,
            self.cache.num_allocated_blocks, self.config.num_kv_heads, torch.device("cpu"),
            min_query_rows=self.min_rows, backend="native" if native else "bmm", native=native,
        )  # fmt: skip
        scale = self.config.head_dim**-0.5
        for layer in self.cache.layers:
            paged_attention(self.query, self.new_kv, layer, metadata, scale)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    torch.set_num_threads(args.threads or default_num_threads())
    try:
        libraries = load_libraries(args)
    except (NativeBuildError, AssertionError) as exc:
        print(f"native kernels for --isa {','.join(args.isa)}: {exc}")
        return 1
    if not libraries:
        print("native kernels unavailable on this machine (see the log): nothing to compare")
        return 1
    config = read_model_config(load_settings().with_model_folder().model)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    print(
        f"lamina bench kernels: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"threads={torch.get_num_threads()}"
    )
    for library in libraries:
        print(
            f"{library.name}: {library.kernels.build.describe()}\n"
            f"  FMA peak {library.fma_peak / 1e9:.0f} GFLOP/s (vector FMAs on registers, "
            f"every thread: the arithmetic ceiling)"
        )
    with torch.inference_mode():
        bench_matmuls(libraries, config, args)
        bench_low_precision_matmuls(libraries, config, args)
        bench_attention(libraries[0].kernels, config, args)
    return 0
