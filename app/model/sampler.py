"""Batched sampling: one token per row of logits, every row with its own SamplingParams.

Order of the pipeline (each stage runs only when some row of the batch needs it):
  raw logits -> logprobs (of the raw model distribution, as vLLM v1 reports them)
  -> grammar masks (constrained rows: tokens the grammar forbids get -inf)
  -> logit_bias -> min_tokens (ban EOS/stop ids) -> repetition, presence, frequency
  -> greedy rows: argmax
  -> random rows: / temperature -> top-k -> top-p -> softmax -> min-p -> inverse CDF

Random rows draw one uniform number each and take the first token whose cumulative
probability exceeds it (exact, and far cheaper on a CPU than noise over the whole
vocabulary). Seeded rows draw their number from a generator seeded by
(seed, choice index, output position), so their samples never depend on batch mates,
batch position or earlier steps; unseeded rows share one global generator.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from app.core import SampleOutput, SamplingParams, TopLogprob
from app.model.constraint_masks import TokenBitmask

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingRequest:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    prompt_token_ids: SequenceOf[int]
    output_token_ids: SequenceOf[int]
    choice_index: int = 0  # n > 1 choices of one seeded request must still differ


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, choice_index: int, output_position: int) -> int:
    """A well-mixed 63-bit generator seed for one seeded draw."""
    mixed = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ choice_index) ^ output_position)
    return mixed & ((1 << 63) - 1)


def _rows(requests: list[SamplingRequest], keep) -> list[int]:
    return [i for i, r in enumerate(requests) if keep(r)]


class Sampler:
    """Turns [S, vocab] logits into S SampleOutputs. Stateless apart from the global RNG."""

    def __init__(
        self,
        eos_token_ids: frozenset[int],
        device: torch.device | str = "cpu",
        seed: int = 0,
        argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """argmax: [S, vocab] fp32 -> [S] int64, as torch.argmax(dim=-1) (the default);
        the runner passes the native kernels' multi-threaded one on the CPU."""
        self.device = torch.device(device)
        self.argmax = argmax or (lambda logits: logits.argmax(dim=-1))
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        requests: list[SamplingRequest],
        token_bitmask: TokenBitmask | None = None,
    ) -> list[SampleOutput]:
        """logits [S, vocab] (any float dtype), one request per row, in order;
        token_bitmask: the allowed tokens of the rows that carry a grammar constraint."""
        if logits.shape[0] != len(requests):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(requests)} requests")
        logits = logits.float()
        _reject_nan_rows(logits)
        wants_logprobs = _rows(requests, lambda r: r.params.logprobs is not None)
        raw_logprobs = None
        if wants_logprobs:
            raw_logprobs = torch.log_softmax(logits[wants_logprobs], dim=-1)
        masked = logits
        if token_bitmask is not None and token_bitmask.rows:
            masked = logits.clone()
            rows = token_bitmask.rows
            masked[rows] = apply_token_bitmask(masked[rows], token_bitmask.words)
        processed = self._process_logits(masked, requests)
        if token_bitmask is not None and processed is not masked:
            _restore_grammar_only_rows(processed, masked, token_bitmask.rows)
        token_ids = self.argmax(processed)  # [S]; right for greedy rows
        random_rows = _rows(requests, lambda r: not r.params.greedy)
        if random_rows:
            chosen = self._sample_random(processed[random_rows], [requests[i] for i in random_rows])
            token_ids[random_rows] = chosen
        return self._outputs(token_ids, raw_logprobs, wants_logprobs, requests)

    # --- logits processors -------------------------------------------------------

    def _process_logits(
        self, logits: torch.Tensor, requests: list[SamplingRequest]
    ) -> torch.Tensor:
        """Bias, min_tokens and penalties, on a copy only when some row needs any."""
        bias_rows = _rows(requests, lambda r: bool(r.params.logit_bias))
        banned_rows = _rows(requests, lambda r: len(r.output_token_ids) < r.params.min_tokens)
        penalty_rows = _rows(requests, lambda r: r.params.needs_penalties)
        if not (bias_rows or banned_rows or penalty_rows):
            return logits
        logits = logits.clone()
        if bias_rows:
            self._apply_logit_bias(logits, bias_rows, requests)
        if banned_rows:
            self._ban_stop_tokens(logits, banned_rows, requests)
        if penalty_rows:
            logits[penalty_rows] = apply_penalties(
                logits[penalty_rows], [requests[i] for i in penalty_rows]
            )
        return logits

    def _apply_logit_bias(
        self, logits: torch.Tensor, rows: list[int], requests: list[SamplingRequest]
    ) -> None:
        pairs = [(row, tok, bias) for row in rows for tok, bias in requests[row].params.logit_bias]
        vocab = logits.shape[1]
        pairs = [p for p in pairs if 0 <= p[1] < vocab]  # ids the model cannot emit: no-op
        if not pairs:
            return
        row_idx, token_idx, values = (torch.tensor(col, device=self.device) for col in zip(*pairs))
        logits.index_put_((row_idx, token_idx), values.float(), accumulate=True)

    def _ban_stop_tokens(
        self, logits: torch.Tensor, rows: list[int], requests: list[SamplingRequest]
    ) -> None:
        """min_tokens: no EOS or stop id before enough output (ignore_eos does not matter)."""
        vocab = logits.shape[1]
        pairs = [
            (row, tok)
            for row in rows
            for tok in set(self.eos_token_ids) | set(requests[row].params.stop_token_ids)
            if 0 <= tok < vocab
        ]
        if pairs:
            row_idx, token_idx = (torch.tensor(col, device=self.device) for col in zip(*pairs))
            logits[row_idx, token_idx] = float("-inf")

    # --- random sampling ---------------------------------------------------------

    def _sample_random(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
        """logits [R, vocab] of the non-greedy rows (a copy we may modify) -> sampled ids [R]."""
        temperatures = torch.tensor([r.params.temperature for r in requests], device=self.device)
        logits = logits.div_(temperatures[:, None])
        top_ks = [r.params.top_k for r in requests]
        if any(top_ks):
            logits = apply_top_k(logits, top_ks)
        top_p_rows = [i for i, r in enumerate(requests) if r.params.top_p < 1.0]
        if top_p_rows:
            top_ps = torch.tensor(
                [requests[i].params.top_p for i in top_p_rows], device=self.device
            )
            if len(top_p_rows) == len(requests):
                logits = apply_top_p(logits, top_ps)
            else:
                logits[top_p_rows] = apply_top_p(logits[top_p_rows], top_ps)
        probs = torch.softmax(logits, dim=-1)
        min_ps = [r.params.min_p for r in requests]
        if any(min_ps):
            probs = apply_min_p(probs, torch.tensor(min_ps, device=self.device))
        return sample_from_probs(probs, self._uniforms(requests))

    def _uniforms(self, requests: list[SamplingRequest]) -> torch.Tensor:
        """One U[0, 1) number per row: [R]."""
        uniforms = torch.rand(len(requests), device=self.device, generator=self.generator)
        # The only per-row loop: each seeded row draws from its own generator.
        for row, request in enumerate(requests):
            if request.params.seed is None:
                continue
            generator = torch.Generator(device=self.device)
            generator.manual_seed(
                row_seed(request.params.seed, request.choice_index, len(request.output_token_ids))
            )
            uniforms[row] = torch.rand((), device=self.device, generator=generator)
        return uniforms

    # --- outputs -----------------------------------------------------------------

    def _outputs(
        self,
        token_ids: torch.Tensor,
        raw_logprobs: torch.Tensor | None,
        logprob_rows: list[int],
        requests: list[SamplingRequest],
    ) -> list[SampleOutput]:
        ids = token_ids.tolist()  # the step's one unavoidable host sync
        outputs = [SampleOutput(token_id=t) for t in ids]
        if raw_logprobs is None:
            return outputs
        chosen_ids = token_ids[logprob_rows][:, None]  # [L, 1]
        chosen = raw_logprobs.gather(1, chosen_ids).squeeze(1).tolist()
        max_top = max(requests[i].params.logprobs for i in logprob_rows)
        top_values, top_ids = ([], [])
        if max_top:
            top = raw_logprobs.topk(max_top, dim=-1)  # sorted, most likely first
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for k, row in enumerate(logprob_rows):
            num_top = requests[row].params.logprobs
            alternatives = (
                tuple(
                    TopLogprob(token_id=t, logprob=v)
                    for t, v in zip(top_ids[k][:num_top], top_values[k][:num_top])
                )
                if num_top
                else ()
            )
            outputs[row] = SampleOutput(ids[row], logprob=chosen[k], top_logprobs=alternatives)
        return outputs


# --- pure tensor functions (unit-tested on their own) ---------------------------------


def _flat_token_index(
    token_lists: list[SequenceOf[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every token in the lists, as two flat tensors."""
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), device=device)
    return rows, tokens.long()


def apply_penalties(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """Repetition (prompt + output, CTRL-style), presence and frequency (output only).

    logits [P, vocab] -> [P, vocab]. Token ids beyond the vocab are ignored.
    """
    num_rows, vocab = logits.shape
    device = logits.device
    counts = torch.zeros(num_rows, vocab + 1, device=device)  # last column: out-of-range ids
    rows, tokens = _flat_token_index([r.output_token_ids for r in requests], device)
    tokens = tokens.masked_fill((tokens < 0) | (tokens >= vocab), vocab)
    counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=counts.dtype), accumulate=True)
    counts = counts[:, :vocab]

    repetition = torch.tensor([r.params.repetition_penalty for r in requests], device=device)
    if (repetition != 1.0).any():
        seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=device)
        rows_p, tokens_p = _flat_token_index([r.prompt_token_ids for r in requests], device)
        tokens_p = tokens_p.masked_fill_((tokens_p < 0) | (tokens_p >= vocab), vocab)
        seen[rows_p, tokens_p] = True
        seen = seen[:, :vocab] | (counts > 0)
        penalty = repetition[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    presence = torch.tensor([r.params.presence_penalty for r in requests], device=device)
    frequency = torch.tensor([r.params.frequency_penalty for r in requests], device=device)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th kept); k = 0 keeps all."""
    vocab = logits.shape[1]
    ks = [min(k, vocab) if k > 0 else vocab for k in top_ks]
    max_k = max(ks)
    top_values = logits.topk(max_k, dim=-1).values  # [R, max_k], descending
    kth = top_values.gather(1, torch.tensor(ks, device=logits.device)[:, None] - 1)  # [R, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(
    logits: torch.Tensor, top_ps: torch.Tensor, candidate_tiers: tuple[int, ...] = (128, 1024)
) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p.

    A full sort of the vocabulary is slow on a CPU (~5 ms a row) and nuclei are usually
    small: look at the best 128 tokens, then 1024 for rows whose nucleus is larger, and
    sort only the rows that still are not covered.
    """
    vocab = logits.shape[1]
    probs = logits.softmax(dim=-1)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    rows = torch.arange(logits.shape[0], device=logits.device)
    for num_candidates in (*candidate_tiers, vocab):
        num_candidates = min(num_candidates, vocab)
        if num_candidates == vocab:
            best_probs, best_ids = probs[rows].sort(dim=-1, descending=True)
        else:
            best_probs, best_ids = probs[rows].topk(num_candidates, dim=-1)  # best first
        keep[rows] = _nucleus(best_probs, best_ids, top_ps[rows], vocab)
        if num_candidates == vocab:
            break
        rows = rows[best_probs.sum(dim=-1) < top_ps[rows]]  # nucleus beyond the candidates
        if not rows.numel():
            break
    return logits.masked_fill(~keep, float("-inf"))


def _nucleus(
    sorted_probs: torch.Tensor, token_ids: torch.Tensor, top_ps: torch.Tensor, vocab: int
) -> torch.Tensor:
    """[R, vocab] mask of the tokens whose better-ranked mass is still below top_p.

    sorted_probs/token_ids [R, K]: the K best tokens of each row, best first; tokens
    outside them are dropped (callers make sure K covers the nucleus).
    """
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the top token has 0 before it
    keep_sorted = mass_before < top_ps[:, None]
    keep = torch.zeros(sorted_probs.shape[0], vocab, dtype=torch.bool, device=token_ids.device)
    return keep.scatter_(1, token_ids, keep_sorted)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row, the first token whose cumulative probability exceeds u * total.

    probs [R, vocab] (need not sum to exactly 1), uniforms [R] in [0, 1) -> ids [R].
    """
    # Defence in depth: a row with no usable mass must still yield an id in the vocabulary.
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
    cdf = probs.cumsum(dim=-1)  # [R, vocab]
    total = cdf[:, -1:]
    # Rounding must never push the target to the total: no token lies beyond it.
    target = torch.minimum(
        uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total))
    )
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return ids.clamp_(max=probs.shape[-1] - 1)


class NonFiniteLogitsError(ValueError):
    """The model produced NaN logits for some rows; their requests must fail."""


def apply_token_bitmask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Forbidden tokens to -inf, vectorised: no loop over rows or the vocabulary.

    logits [R, vocab], words [R, ceil(vocab / 32)] int32 (bit t of a row allows token t)
    -> [R, vocab].
    """
    num_rows, vocab = logits.shape
    words = words.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    allowed = bits.view(num_rows, -1)[:, :vocab].to(device=logits.device, dtype=torch.bool)
    return logits.masked_fill(~allowed, float("-inf"))


def _restore_grammar_only_rows(
    processed: torch.Tensor, masked: torch.Tensor, rows: list[int]
) -> None:
    """A constrained row with nothing left after min_tokens' EOS ban (the grammar allows
    only EOS) takes the grammar's choice: the constraint outranks min_tokens."""
    dead = torch.isneginf(processed[rows]).all(dim=-1)  # [C]
    if bool(dead.any()):
        dead_rows = [row for row, is_dead in zip(rows, dead.tolist()) if is_dead]
        processed[dead_rows] = masked[dead_rows]


def _reject_nan_rows(logits: torch.Tensor) -> None:
    """Raise if any row of the raw logits [S, vocab] holds a NaN.

    The engine reruns a failed batch one sequence at a time, so only the requests whose
    rows are broken fail; sampling garbage from them would be a silent wrong answer.
    """
    # One sum first (a NaN anywhere makes it NaN; so can +inf and -inf together, which
    # the row check below then clears): ~6x cheaper than isnan + any on every step.
    if not bool(torch.isnan(logits.sum())):
        return
    nan_rows = torch.isnan(logits).any(dim=-1)
    if bool(nan_rows.any()):
        rows = nan_rows.nonzero().flatten().tolist()
        raise NonFiniteLogitsError(f"the model produced NaN logits (batch rows {rows})")


def apply_min_p(probs: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Zero the tokens less likely than min_p times the row's most likely token."""
    threshold = probs.max(dim=-1, keepdim=True).values * min_ps[:, None]
    return probs.masked_fill(probs < threshold, 0.0)
