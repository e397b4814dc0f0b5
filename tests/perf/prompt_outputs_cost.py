"""What prompt outputs cost on top of the prefill they ride on: the default model, CPU,
fp32, in-process (EngineCore over the real runner). Each variant computes the same 8
prompts of 256 tokens from an empty prefix cache:

- `prefill`: max_tokens 1, greedy: an ordinary prompt and one token (the baseline);
- `echo-logprobs`: the same with prompt_logprobs=1 (what lm-eval's loglikelihood asks);
- `prompt-only-logprobs`: max_tokens 0 with prompt_logprobs=5;
- `embed-last`, `embed-mean`: max_tokens 0, pooled (what /v1/embeddings runs).

Variants are interleaved and repeated; the report gives each one's median seconds
(wall and process CPU) and its ratios to `prefill` within the same round, by wall and
by CPU time (the steadier of the two on a shared machine):

    python -m tests.perf.prompt_outputs_cost [--repeats 5] [--prompts 8] [--tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

from app.bench.corpus import PASSAGE
from app.config import load_settings
from app.core import SamplingParams
from app.engine.engine_core import EngineCore
from app.model.runner import ModelRunner
from app.tokenizer import Tokenizer
from app.weights import default_model_dir

VARIANTS = {
    "prefill": SamplingParams(max_tokens=1, temperature=0.0),
    "echo-logprobs": SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, prompt_logprobs=1),
    "prompt-only-logprobs": SamplingParams(max_tokens=0, prompt_logprobs=5),
    "embed-last": SamplingParams(max_tokens=0, pooling="last"),
    "embed-mean": SamplingParams(max_tokens=0, pooling="mean"),
}


def run_once(runner, tokenizer, settings, prompts, params) -> tuple[float, float]:
    core = EngineCore(runner, tokenizer, settings)  # an empty prefix cache each time
    for i, prompt in enumerate(prompts):
        assert core.add_request(f"r{i}", prompt, params) == []
    wall, cpu = time.perf_counter(), time.process_time()
    while core.has_unfinished():
        for delta in core.step():
            assert delta.error is None, delta.error
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    model = default_model_dir()
    settings = load_settings(
        environ={}, model=model, kv_cache_gb=0.5, device="cpu", dtype="float32"
    )
    runner, tokenizer = ModelRunner.from_settings(settings), Tokenizer(model)
    ids = tokenizer.encode(PASSAGE)
    prompts = [ids[7 * i : 7 * i + args.tokens] for i in range(args.prompts)]
    assert all(len(p) == args.tokens for p in prompts), "the corpus is too short"
    run_once(runner, tokenizer, settings, prompts, VARIANTS["prefill"])  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    wall_ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, params in VARIANTS.items():
            seconds, cpu_seconds = run_once(runner, tokenizer, settings, prompts, params)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        for name in VARIANTS:
            wall_ratios[name].append(wall[name][-1] / wall["prefill"][-1])
            cpu_ratios[name].append(cpu[name][-1] / cpu["prefill"][-1])
    print(f"{args.prompts} prompts x {args.tokens} tokens, {args.repeats} rounds (medians)")
    print(f"{'variant':<22}{'wall s':>9}{'cpu s':>9}{'wall/prefill':>14}{'cpu/prefill':>13}")
    med = statistics.median
    for name in VARIANTS:
        print(
            f"{name:<22}{med(wall[name]):>9.3f}{med(cpu[name]):>9.3f}"
            f"{med(wall_ratios[name]):>14.3f}{med(cpu_ratios[name]):>13.3f}"
        )


if __name__ == "__main__":
    main()
