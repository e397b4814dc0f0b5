"""`lamina bench engine`: offline throughput of our engine vs transformers' generate.

Fixed workload (seeded): N prompts of about P tokens, O new tokens each, EOS ignored.
For each concurrency C, lamina's EngineCore runs a closed loop with C sequences in
flight, and transformers' `generate` runs the same prompts in static left-padded
batches of C. Both run in the same process, one after the other, so the ratio holds
even on a noisy machine. Model-FLOPs utilisation (MFU) is the useful model FLOPs
(app/bench/flops.py: no padding, logits only where sampled) per second over the best
matmul throughput measured here and now, in the dtype the matmuls run in.

`--weight-dtype float32,bfloat16` loads one engine per weight precision and runs them
one after the other at each level (`--repeats` times, alternating, best run kept), so
their ratio comes from the same minutes of a shared machine; transformers runs once per
level, in the model dtype.

The full default run (64 prompts x 128 tokens at 1, 8 and 32) takes about a quarter
of an hour on two CPU cores; `--quick` and `--concurrency` make smaller runs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from app.bench.closed_loop import closed_loop, make_prompts
from app.bench.flops import FlopCounts, measure_matmul_peak
from app.config import load_settings
from app.core import SamplingParams


@dataclass
class LevelResult:
    concurrency: int
    weight_dtype: str  # as asked for: auto, float32, float16, bfloat16
    num_requests: int
    output_tokens: int
    lamina_seconds: float
    lamina_tok_s: float
    lamina_mfu: float
    lamina_fma_share: float | None  # useful FLOP/s over the register-only FMA peak
    baseline_seconds: float | None
    baseline_tok_s: float | None
    ratio: float | None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lamina bench engine", description=__doc__)
    parser.add_argument(
        "--model",
        help="a model folder, .gguf file or hub id, any family lamina runs (LAMINA_MODEL)",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--weight-dtype",
        default="auto",
        help="weight precision, or several comma-separated (e.g. float32,bfloat16): each "
        "runs at every level, alternating, in this one process",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per level and precision (best kept)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    parser.add_argument(
        "--no-batch-invariant", action="store_true", help="measure without batch invariance"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument(
        "--no-native-kernels",
        action="store_true",
        help="torch's kernels instead of lamina's compiled ones (CPU, fp32)",
    )
    parser.add_argument(
        "--no-fused-layers",
        action="store_true",
        help="run the native kernels one op at a time instead of the fused decoder stack",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: as many prompts as the highest level, 32 new tokens",
    )
    parser.add_argument(
        "--structured",
        nargs="?",
        const="builtin",
        metavar="SCHEMA.json",
        help="constrained (JSON schema) against unconstrained decoding, plus compile times "
        "(app/bench/structured_bench.py); without a file, a built-in schema",
    )
    parser.add_argument(
        "--workload",
        choices=["random", "repetitive", "chat"],
        default="random",
        help="random token prompts, chat requests to rewrite a passage fixing its typos "
        "(app/bench/repetitive.py), where prompt lookup helps, or ordinary chat questions "
        "(app/bench/chat_questions.py)",
    )
    parser.add_argument(
        "--speculative",
        help="comma-separated LAMINA_SPECULATIVE modes (e.g. off,ngram,draft): each runs at "
        "every level, alternating, outputs compared (app/bench/speculative_bench.py)",
    )
    parser.add_argument(
        "--speculative-model",
        type=Path,
        help="LAMINA_SPECULATIVE_MODEL: the draft model folder of the `draft` mode",
    )
    parser.add_argument(
        "--speculative-weight-dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16", "int8", "int4"],
        help="LAMINA_SPECULATIVE_WEIGHT_DTYPE: the draft model's weight storage",
    )
    parser.add_argument(
        "--speculative-max-batch",
        type=int,
        help="LAMINA_SPECULATIVE_MAX_BATCH for the runs (default: the setting's)",
    )
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.weight_dtypes = args.weight_dtype.split(",")
    if args.quick:
        args.num_prompts = min(args.num_prompts, max(args.levels))
        args.output_len = min(args.output_len, 32)
    return args


def run_lamina(
    core, prompts: list[list[int]], concurrency: int, output_len: int
) -> tuple[int, float]:
    """Closed loop: keep `concurrency` requests in flight until all prompts are done."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    return closed_loop(core, prompts, params, concurrency, "bench")


def run_transformers(
    model, prompts: list[list[int]], batch_size: int, output_len: int, pad_id: int
) -> tuple[int, float]:
    """transformers' generate in static left-padded batches (its usual offline use)."""
    num_tokens = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device
        )
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=pad_id,
            )
        num_tokens += (out.shape[1] - width) * len(batch)
    _sync(model.device)
    return num_tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from app.tokenizer import Tokenizer

    args = parse_args(argv or [])
    engines = [Engine(args, weight_dtype) for weight_dtype in args.weight_dtypes]
    settings = engines[0].settings
    tokenizer = Tokenizer(settings.model)
    if args.structured:
        from app.bench.structured_bench import main as bench_structured

        return bench_structured(args, engines[0], tokenizer)
    if args.speculative or args.workload in ("repetitive", "chat"):
        from app.bench.speculative_bench import main as bench_speculative

        return bench_speculative(args, engines[0], tokenizer)
    prompts = make_prompts(tokenizer.vocab_size, args.num_prompts, args.prompt_len, args.seed)
    counts = FlopCounts.from_model_dir(settings.model)
    workload_flops = sum(counts.request(len(p), args.output_len) for p in prompts)
    runner = engines[0].runner
    baseline = None
    if not args.no_baseline:
        baseline = _load_baseline(settings.model, torch.device(runner.device), runner.dtype)
    print(_header(engines, args), flush=True)
    results = []
    for level in args.levels:
        b_tokens = b_seconds = None
        if baseline is not None:
            run_transformers(baseline, prompts[:level], level, 2, 2)  # warm this shape
            b_tokens, b_seconds = run_transformers(baseline, prompts, level, args.output_len, 2)
        b_tok_s = b_tokens / b_seconds if b_tokens else None
        runs = {engine.weight_dtype: engine.core(tokenizer) for engine in engines}
        for core in runs.values():
            run_lamina(core, prompts[: min(4, len(prompts))], level, 4)  # warm this shape
        best = dict.fromkeys(runs, (0, float("inf")))
        for _ in range(args.repeats):  # precisions alternate: the same minutes for each
            for weight_dtype, core in runs.items():
                tokens, seconds = run_lamina(core, prompts, level, args.output_len)
                best[weight_dtype] = min(best[weight_dtype], (tokens, seconds), key=_rate)
        for engine in engines:
            tokens, seconds = best[engine.weight_dtype]
            result = LevelResult(
                concurrency=level,
                weight_dtype=engine.weight_dtype,
                num_requests=len(prompts),
                output_tokens=tokens,
                lamina_seconds=seconds,
                lamina_tok_s=tokens / seconds,
                lamina_mfu=workload_flops / seconds / engine.peak[0],
                lamina_fma_share=workload_flops / seconds / engine.fma_peak
                if engine.fma_peak
                else None,
                baseline_seconds=b_seconds,
                baseline_tok_s=b_tok_s,
                ratio=(tokens / seconds) / b_tok_s if b_tok_s else None,
            )
            results.append(result)
            print(_row(result), flush=True)
    if len(engines) > 1:
        print(_precision_ratios(results, args.weight_dtypes), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


class Engine:
    """A runner loaded with one weight precision, and the ceilings its MFU and FMA% use."""

    def __init__(self, args: argparse.Namespace, weight_dtype: str) -> None:
        from app.model.runner import ModelRunner

        self.weight_dtype = weight_dtype
        model = {"model": args.model} if args.model else {}  # else LAMINA_MODEL or the default
        self.settings = load_settings(
            **model,
            device=args.device,
            dtype=args.dtype,
            weight_dtype=weight_dtype,
            num_threads=args.threads,
            batch_invariant=not args.no_batch_invariant,
            native_kernels=not args.no_native_kernels,
            max_num_seqs=max(args.levels),
            enable_prefix_caching=False,
            max_num_batched_tokens=max(512, max(args.levels)),
        ).with_model_folder()  # a .gguf file or a hub id, as the server takes them
        self.runner = ModelRunner.from_settings(self.settings)
        if args.no_fused_layers:
            self.runner.model.fuse_layers = False
        self.runner.warmup()
        self.peak = _peak(torch.device(self.runner.device), self.runner)
        # The arithmetic ceiling, where lamina's CPU kernels run: MFU's matmul peak is
        # itself only a share of it.
        native = self.runner.model.native
        self.fma_peak = native.fma_peak() if native else None

    def core(self, tokenizer):
        from app.engine.engine_core import EngineCore

        return EngineCore(self.runner, tokenizer, self.settings)


def _rate(run: tuple[int, float]) -> float:
    tokens, seconds = run
    return -tokens / seconds  # min() of this is the fastest run


def _precision_ratios(results: list[LevelResult], weight_dtypes: list[str]) -> str:
    """tok/s of each precision over the first one's, level by level."""
    first = {r.concurrency: r.lamina_tok_s for r in results if r.weight_dtype == weight_dtypes[0]}
    lines = []
    for weight_dtype in weight_dtypes[1:]:
        cells = [
            f"{r.concurrency}: {r.lamina_tok_s / first[r.concurrency]:.2f}x"
            for r in results
            if r.weight_dtype == weight_dtype
        ]
        lines.append(f"{weight_dtype} / {weight_dtypes[0]} tok/s: " + ", ".join(cells))
    return "\n".join(lines)


def _peak(device: torch.device, runner) -> tuple[float, str, torch.dtype]:
    """The best matmul rate in the model dtype, or in the matmul dtype when that is faster
    (bf16 on CPUs with bf16 instructions). fp16 on a CPU is left out: without fp16 GEMM
    instructions a 2048-square fp16 matmul crawls (well under 1 GFLOP/s here, minutes to
    measure), below what lamina's fp16 gemv reaches, so it is no ceiling."""
    dtypes = {runner.dtype, runner.matmul_dtype}
    if device.type == "cpu":
        dtypes.discard(torch.float16)
    dtypes = dtypes or {torch.float32}
    peaks = [measure_matmul_peak(device, dtype) + (dtype,) for dtype in dtypes]
    return max(peaks, key=lambda p: p[0])


def _load_baseline(model_dir: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from app.model.gguf_folder import transformers_kwargs

    extra = transformers_kwargs(Path(model_dir))  # a .gguf's folder: transformers reads it
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra).to(device)
    return model.eval()


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _header(engines: list[Engine], args) -> str:
    runner, settings = engines[0].runner, engines[0].settings
    fma_peak = engines[0].fma_peak
    fma = (
        f"FMA peak {fma_peak / 1e9:.0f} GFLOP/s (vector FMAs on registers, every thread: "
        f"the arithmetic ceiling); FMA% = useful model FLOPs / time / FMA peak\n"
        if fma_peak
        else ""
    )
    precisions = "".join(
        f"weights {e.weight_dtype}: matmuls in {e.runner.kernel_summary()['matmul']}, "
        f"kernels={_kernels_label(e.runner.model)}, matmul peak {e.peak[0] / 1e9:.0f} "
        f"GFLOP/s ({e.peak[1]}, {e.peak[2]})\n"
        for e in engines
    )
    return (
        f"lamina bench engine: device={runner.device} dtype={runner.dtype} "
        f"threads={torch.get_num_threads()} batch_invariant={settings.batch_invariant} "
        f"best of {args.repeats}\n{precisions}"
        f"MFU = useful model FLOPs / time / that precision's matmul peak\n{fma}"
        f"workload: {args.num_prompts} prompts x ~{args.prompt_len} tokens, "
        f"{args.output_len} new tokens each, EOS ignored\n"
        f"{'conc':>5} {'weights':>9} {'lamina tok/s':>13} {'MFU':>6} {'FMA%':>6} "
        f"{'transformers tok/s':>19} {'ratio':>6}"
    )


def _kernels_label(model) -> str:
    if model.native is None:
        return "torch"
    return "native, fused layers" if model.fuse_layers else "native, one op at a time"


def _row(r: LevelResult) -> str:
    base = f"{r.baseline_tok_s:19.1f}" if r.baseline_tok_s else f"{'-':>19}"
    ratio = f"{r.ratio:6.2f}" if r.ratio else f"{'-':>6}"
    fma = f"{r.lamina_fma_share:6.1%}" if r.lamina_fma_share else f"{'-':>6}"
    return (
        f"{r.concurrency:5d} {r.weight_dtype:>9} {r.lamina_tok_s:13.1f} {r.lamina_mfu:6.1%} "
        f"{fma} {base} {ratio}"
    )
