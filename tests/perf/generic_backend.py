"""What the generic backend costs: one model served natively and through the generic
backend (transformers' modules, lamina's paged attention), in one process, the two
engines alternating at each concurrency level, best of `--repeats`.

    .venv/bin/python -m tests.perf.generic_backend [--model PATH] [--concurrency 1,8]

The model must be one lamina runs natively (the default model unless --model says
otherwise); the generic backend loads the same folder as transformers' causal LM.
"""

from __future__ import annotations

import argparse

import torch

from app.bench.closed_loop import closed_loop
from app.bench.engine_bench import make_prompts
from app.config import load_settings
from app.core import SamplingParams


def _generic_runner(native_runner, settings):
    """A runner over the same folder through the generic backend, with as many KV blocks."""
    from app.model.config import read_config_json, read_eos_token_ids
    from app.model.generic import generic_config, load_generic
    from app.model.kv_cache import KVCache
    from app.model.linear import kernel_plan
    from app.model.runner import ModelRunner

    config = generic_config(settings.model, read_config_json(settings.model))
    cpu = torch.device("cpu")
    plan = kernel_plan(cpu, torch.float32, None, settings.batch_invariant, "auto")
    model = load_generic(settings.model, config, cpu, torch.float32, plan)
    cache = KVCache(
        config, native_runner.num_blocks, settings.block_size, torch.device("cpu"), torch.float32
    )
    return ModelRunner(
        model,
        cache,
        max_model_len=native_runner.max_model_len,
        eos_token_ids=read_eos_token_ids(settings.model),
        num_threads=native_runner.num_threads,
        max_num_seqs=settings.max_num_seqs,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a native family's folder (default: LAMINA_MODEL)")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from app.engine.engine_core import EngineCore
    from app.model.runner import ModelRunner
    from app.tokenizer import Tokenizer

    levels = [int(c) for c in args.concurrency.split(",")]
    model = {"model": args.model} if args.model else {}
    settings = load_settings(
        **model,
        device="cpu",
        dtype="float32",
        enable_prefix_caching=False,
        max_num_seqs=max(levels),
        max_num_batched_tokens=512,
    )
    native = ModelRunner.from_settings(settings)
    generic = _generic_runner(native, settings)
    runners = {"native": native, "generic": generic}
    for runner in runners.values():
        runner.warmup()
    tokenizer = Tokenizer(settings.model)
    prompts = make_prompts(native.config.vocab_size, args.num_prompts, args.prompt_len, seed=0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    print(f"model {settings.model}: tok/s, best of {args.repeats}, engines alternating")
    print("concurrency  native  generic  generic/native")
    for level in levels:
        best = dict.fromkeys(runners, 0.0)
        for repeat in range(args.repeats):
            for name, runner in runners.items():
                core = EngineCore(runner, tokenizer, settings)
                tokens, seconds = closed_loop(core, prompts, params, level, f"{name}{repeat}")
                best[name] = max(best[name], tokens / seconds)
        ratio = best["generic"] / best["native"]
        print(f"{level:>11}  {best['native']:6.1f}  {best['generic']:7.1f}  {ratio:14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
