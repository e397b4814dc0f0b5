"""A Runner without a model: it sleeps for as long as a step would take, then samples.

`time.sleep` releases the GIL like torch kernels do, and costs no CPU, so a server
built on it (overhead_server.py) spends CPU only on what is *not* model math: HTTP,
SSE, the event loop, the scheduler, the detokenizer and delta delivery. That makes its
CPU time per token a noise-robust measure of the serving overhead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as SequenceOf

from app.core import SampleOutput, ScheduledBatch

# Real words, so the detokenizer does the work it does for real text.
SAMPLE_TEXT = (
    " The river winds through the valley, past old stone bridges and quiet farms,"
    " where herons wait in the reeds and the morning fog lifts slowly over the fields."
)


class SleepRunner:
    """Implements app.engine.protocol.Runner. A step lasts
    fixed_s + per_seq_s * sequences + per_token_s * tokens: a CPU step has a fixed part,
    a part per sequence (decode attention, sampling) and a part per token (the matmuls).
    """

    def __init__(
        self,
        token_ids: list[int],
        *,
        fixed_s: float = 0.005,
        per_seq_s: float = 0.0,
        per_token_s: float = 0.0,
        block_size: int = 16,
        num_blocks: int = 8192,
        max_model_len: int = 2048,
    ) -> None:
        if not token_ids:
            raise ValueError("token_ids must not be empty")
        self.token_ids = token_ids
        self.fixed_s = fixed_s
        self.per_seq_s = per_seq_s
        self.per_token_s = per_token_s
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.num_steps = 0
        self.step_tokens: list[int] = []  # num_batched_tokens of every step

    def execute(self, batch: ScheduledBatch) -> list[SampleOutput | None]:
        num_tokens, num_seqs = batch.num_batched_tokens, len(batch.seqs)
        time.sleep(self.fixed_s + self.per_seq_s * num_seqs + self.per_token_s * num_tokens)
        self.num_steps += 1
        self.step_tokens.append(batch.num_batched_tokens)
        outputs: list[SampleOutput | None] = []
        for scheduled in batch.seqs:
            if not scheduled.sample:
                outputs.append(None)
                continue
            seq = scheduled.seq
            position = seq.seq_id + len(seq.output_token_ids)
            outputs.append(SampleOutput(self.token_ids[position % len(self.token_ids)]))
        return outputs

    def release(self, seq_ids: SequenceOf[int]) -> None:
        pass
