"""Prompt outputs: what some requests want of the prompt itself, not of what follows it.

A completion with `echo` and `logprobs` (evaluation harnesses) wants every prompt
token's log-probability given the tokens before it; an embedding wants the prompt's
final hidden states (after the final norm) pooled into one vector. Both are computed
from the hidden states the step already has, while the prompt is computed, for the
sequences that ask (`Sequence.needs_prompt_result`) and no other.

A prompt may be computed in chunks over several steps (chunked prefill), and again
after a preemption, so the results are kept per sequence *by position*: a chunk fills
its positions, a recomputed chunk overwrites them with the same values. Nothing is
summed across chunks (where the chunks fall depends on the rest of the batch): the mean
is taken once, over all rows, when the result is taken. Each row's log-softmax and each
row's hidden state are computed on their own, so the result does not depend on the
batch or the chunking (tests/model/test_prompt_outputs.py checks it bitwise).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import torch

from app.core import PromptLogprob, PromptResult, Sequence, TopLogprob

# Logit rows computed at once: [rows, vocab] fp32 is ~200 KB a row for a 49k vocabulary.
LOGIT_ROWS_PER_CALL = 64

# hidden rows [R, hidden] -> logits [R, vocab] (the model's head, prompt rows' kernels)
ComputeLogits = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Collecting:
    """One sequence's prompt outputs so far, by prompt position."""

    num_prompt: int
    logprobs: list[PromptLogprob | None] | None  # [num_prompt]; None: not asked
    mean_rows: torch.Tensor | None = None  # [num_prompt, hidden] fp32 on the CPU (mean)
    last_row: torch.Tensor | None = None  # [hidden] fp32 on the CPU (last)
    filled: set[int] = field(default_factory=set)  # positions computed so far


class PromptOutputs:
    """Collects the prompt outputs of the sequences that ask, step by step."""

    def __init__(self, compute_logits: ComputeLogits) -> None:
        self._compute_logits = compute_logits
        self._by_seq: dict[int, _Collecting] = {}

    def collect(self, seq: Sequence, start: int, hidden: torch.Tensor) -> None:
        """Take what seq asked for from the hidden states of its prompt positions
        [start, start + R): hidden [R, hidden], after the final norm."""
        params = seq.params
        state = self._by_seq.get(seq.seq_id)
        if state is None:
            num_prompt = seq.num_prompt_tokens
            state = _Collecting(
                num_prompt,
                [None] * num_prompt if params.prompt_logprobs is not None else None,
            )
            self._by_seq[seq.seq_id] = state
        end = start + hidden.shape[0]
        if params.pooling == "mean":
            if state.mean_rows is None:
                state.mean_rows = torch.zeros(state.num_prompt, hidden.shape[1])
            state.mean_rows[start:end] = hidden.float().cpu()
        elif params.pooling == "last" and end == state.num_prompt:
            state.last_row = hidden[-1].float().cpu()
        if state.logprobs is not None:
            # Row p predicts token p + 1; the last prompt row predicts the first output.
            num_rows = min(end, state.num_prompt - 1) - start
            if num_rows > 0:
                targets = seq.prompt_token_ids[start + 1 : start + 1 + num_rows]
                entries = self._logprobs(hidden[:num_rows], targets, params.prompt_logprobs)
                state.logprobs[start + 1 : start + 1 + num_rows] = entries
        state.filled.update(range(start, end))

    def _logprobs(
        self, hidden: torch.Tensor, targets: list[int], num_top: int
    ) -> list[PromptLogprob]:
        """hidden [R, hidden] of positions whose next tokens are `targets` [R]."""
        entries: list[PromptLogprob] = []
        for first in range(0, len(targets), LOGIT_ROWS_PER_CALL):
            rows = hidden[first : first + LOGIT_ROWS_PER_CALL]
            ids = targets[first : first + LOGIT_ROWS_PER_CALL]
            logprobs = torch.log_softmax(self._compute_logits(rows).float(), dim=-1)  # [r, vocab]
            target_ids = torch.tensor(ids, device=logprobs.device)[:, None]  # [r, 1]
            chosen = logprobs.gather(1, target_ids)  # [r, 1]
            ranks = (logprobs > chosen).sum(dim=1) + 1  # [r]
            top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (None, None)
            chosen_list, rank_list = chosen[:, 0].tolist(), ranks.tolist()
            top_v = top_values.tolist() if top_values is not None else [[]] * len(ids)
            top_i = top_ids.tolist() if top_ids is not None else [[]] * len(ids)
            for k, token_id in enumerate(ids):
                top = tuple(TopLogprob(t, v) for t, v in zip(top_i[k], top_v[k]))
                entries.append(PromptLogprob(token_id, chosen_list[k], rank_list[k], top))
        return entries

    def take(self, seq_id: int) -> PromptResult:
        """The complete prompt outputs of a sequence whose prompt is computed; forgets them."""
        state = self._by_seq.pop(seq_id, None)
        if state is None:
            raise RuntimeError("no prompt outputs were computed for this sequence")
        # Last-token pooling alone needs the last position only (the rest may be cached).
        needs_all = state.logprobs is not None or state.mean_rows is not None
        needed = state.num_prompt if needs_all else 1
        found = len(state.filled) if needs_all else int(state.last_row is not None)
        if found != needed:
            raise RuntimeError(f"prompt outputs incomplete: {needed - found} positions missing")
        pooled = None
        if state.mean_rows is not None:
            pooled = tuple(state.mean_rows.to(torch.float64).mean(dim=0).tolist())
        elif state.last_row is not None:
            pooled = tuple(state.last_row.tolist())
        return PromptResult(tuple(state.logprobs or ()), pooled)

    def release(self, seq_ids: SequenceOf[int]) -> None:
        for seq_id in seq_ids:
            self._by_seq.pop(seq_id, None)
