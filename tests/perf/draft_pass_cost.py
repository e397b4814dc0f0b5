"""What a draft model's forward pass costs next to a decode step of the served model
(c in docs/speculative-decoding.md: decoding runs about t / (1 + k c) times as fast with
t tokens confirmed per verify step and k draft tokens): the default model in fp32 as
the served one, a draft (by default the same folder with int4 weights), CPU,
in-process, each on its own runner and KV cache. For each batch size, one decode step
of every sequence (100 tokens of context) on the served model, then the same on the
draft, alternating `--repeats` times; the report gives both medians and the median of
the per-round ratios:

    python -m tests.perf.draft_pass_cost [--draft FOLDER] [--draft-weights int4] \
        [--batches 1,8] [--repeats 25]
"""

from __future__ import annotations

import argparse
import statistics
import time

from app.config import load_settings
from app.core import SamplingParams, ScheduledBatch, ScheduledSeq, Sequence
from app.model.runner import ModelRunner
from app.weights import default_model_dir

CONTEXT_TOKENS = 100


def decoding_batch(num_seqs: int, block_size: int) -> ScheduledBatch:
    """num_seqs sequences with CONTEXT_TOKENS cached each (junk K/V: timing only), one
    token to decode; each its own blocks."""
    blocks_per_seq = -(-(CONTEXT_TOKENS + 1) // block_size)
    items = []
    for i in range(num_seqs):
        seq = Sequence(f"s{i}", list(range(100 + i, 100 + i + CONTEXT_TOKENS)),
                       SamplingParams(temperature=0), 8)  # fmt: skip
        seq.output_token_ids = [5]
        seq.num_computed_tokens = CONTEXT_TOKENS
        seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        items.append(ScheduledSeq(seq, 1, sample=True))
    return ScheduledBatch(items, num_seqs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", help="draft model folder (default: the default model)")
    parser.add_argument("--draft-weights", default="int4", help="its weight storage")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    model = default_model_dir()
    settings = load_settings(
        environ={},
        model=model,
        kv_cache_gb=0.2,
        device="cpu",
        dtype="float32",
        speculative="draft",
        speculative_model=args.draft or model,
        speculative_weight_dtype=args.draft_weights,
    )
    runner = ModelRunner.from_settings(settings)
    runner.warmup()  # the draft's too
    draft = runner.draft_runner
    for num_seqs in (int(b) for b in args.batches.split(",")):
        batch = decoding_batch(num_seqs, runner.block_size)
        target_s, draft_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            runner.execute(batch)
            middle = time.perf_counter()
            draft.execute(batch)
            target_s.append(middle - start)
            draft_s.append(time.perf_counter() - middle)
        ratios = [d / t for t, d in zip(target_s, draft_s)]
        print(
            f"{num_seqs} sequences: served model's step {statistics.median(target_s) * 1e3:.1f} "
            f"ms, draft pass {statistics.median(draft_s) * 1e3:.1f} ms, "
            f"c = {statistics.median(ratios):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
