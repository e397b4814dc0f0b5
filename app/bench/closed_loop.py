"""The closed loop the engine benchmarks drive (a fixed number of requests in flight),
and their random prompts."""

from __future__ import annotations

import random
import time

from app.core import SamplingParams


def closed_loop(
    core,
    prompts: list[list[int]],
    params: SamplingParams,
    concurrency: int,
    tag: str,
    outputs: dict[int, list[int]] | None = None,
) -> tuple[int, float]:
    """Keep `concurrency` requests in flight until every prompt is done, stepping `core`
    on this thread: (output tokens, seconds). Request ids are `{tag}-{concurrency}-{i}`.
    `outputs`, when given, receives each prompt's output token ids by prompt index."""
    queue = list(enumerate(prompts))
    in_flight, num_tokens = 0, 0
    start = time.perf_counter()
    while queue or core.has_unfinished():
        while queue and in_flight < concurrency:
            index, prompt = queue.pop(0)
            core.add_request(f"{tag}-{concurrency}-{index}", prompt, params)
            in_flight += 1
        for delta in core.step():
            if delta.error:
                raise RuntimeError(delta.error)
            num_tokens += len(delta.token_ids)
            if outputs is not None:
                index = int(delta.request_id.rsplit("-", 1)[1])
                outputs.setdefault(index, []).extend(delta.token_ids)
            if delta.finished:
                in_flight -= 1
    return num_tokens, time.perf_counter() - start


def make_prompts(vocab_size: int, num: int, mean_len: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, lengths within +-6% of the mean (so padding is real)."""
    rng = random.Random(seed)
    spread = max(1, mean_len // 16)
    # Skip the low ids, where the special tokens of most vocabularies live.
    return [
        [rng.randrange(100, vocab_size) for _ in range(mean_len + rng.randint(-spread, spread))]
        for _ in range(num)
    ]
