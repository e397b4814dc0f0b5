"""Turn one sampled token of one sequence into the TokenDelta its caller receives."""

from __future__ import annotations

from dataclasses import dataclass

from app.core import (
    FinishReason,
    PromptResult,
    PromptTokenLogprob,
    RequestTimings,
    SampleOutput,
    Sequence,
    TokenDelta,
    TokenLogprob,
    Usage,
)
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.protocol import TokenizerLike

# A first delta's prompt outputs: per prompt token logprobs (None for the first), the
# pooled hidden state (None: not asked)
PromptPart = tuple[tuple[PromptTokenLogprob | None, ...], tuple[float, ...] | None]


@dataclass
class FinishInfo:
    reason: FinishReason
    stop_reason: str | int | None = None
    error: str | None = None


class SequenceOutput:
    """Per-sequence output state, owned by the engine thread: detokenizer and counters."""

    def __init__(self, seq: Sequence, tokenizer: TokenizerLike) -> None:
        self.seq = seq
        self._tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, seq.params)
        self.prompt_result_sent = False  # its PromptResult went out with its first delta

    def on_token(self, sample: SampleOutput) -> tuple[str, str | None]:
        """Feed the new token to the detokenizer: (text to emit now, matched stop string)."""
        return self.detokenizer.append(sample.token_id)

    def token_logprob(self, sample: SampleOutput) -> TokenLogprob | None:
        if self.seq.params.logprobs is None or sample.logprob is None:
            return None
        text_of = self._tokenizer_text
        top = tuple((t.token_id, text_of(t.token_id), t.logprob) for t in sample.top_logprobs)
        return TokenLogprob(sample.token_id, text_of(sample.token_id), sample.logprob, top)

    def prompt_logprobs(self, result: PromptResult) -> tuple[PromptTokenLogprob | None, ...]:
        """The runner's prompt log-probabilities with each token's text."""
        text_of = self._tokenizer_text
        return tuple(
            None
            if entry is None
            else PromptTokenLogprob(
                entry.token_id,
                text_of(entry.token_id),
                entry.logprob,
                entry.rank,
                tuple((t.token_id, text_of(t.token_id), t.logprob) for t in entry.top_logprobs),
            )
            for entry in result.logprobs
        )

    def _tokenizer_text(self, token_id: int) -> str:
        token_text = getattr(self._tokenizer, "token_text", None)
        if token_text is not None:
            return token_text(token_id)
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def delta(
        self,
        text: str,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...] = (),
        finish: FinishInfo | None = None,
        timings: RequestTimings | None = None,
    ) -> TokenDelta:
        seq = self.seq
        usage = None
        if finish is not None:
            usage = Usage(
                prompt_tokens=seq.num_prompt_tokens,
                completion_tokens=len(seq.output_token_ids),
                cached_tokens=seq.num_cached_tokens,
            )
        return TokenDelta(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish.reason if finish else None,
            stop_reason=finish.stop_reason if finish else None,
            usage=usage,
            error=finish.error if finish else None,
            timings=timings,
        )
