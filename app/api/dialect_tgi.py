"""The TGI dialect: /generate, /generate_stream and / (see driver.py).

huggingface_hub's InferenceClient.text_generation speaks it. Streams send one event per
token; the last one also carries `generated_text` and `details`. A delta's text goes
on its last token (the text of a token is what it added to the output). Text that
arrives without a token is carried to the next token; a choice that ends without a
new token closes with an empty special token.
"""

from __future__ import annotations

from collections.abc import Iterable

from app.api.constraints import tgi_grammar_constraint
from app.api.driver import ChoiceResult, Dialect
from app.api.errors import invalid_request
from app.api.params import tgi_inputs
from app.api.request_record import Usage
from app.api.schemas_tgi import (
    GenerateDetails,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    TGIFinishReason,
    TGIToken,
)
from app.api.sse import finite, json_string, sse_event
from app.api.state import Serving
from app.core import FinishReason, TokenDelta, TokenLogprob


def tgi_finish_reason(
    reason: FinishReason | None, stop_reason: str | int | None
) -> TGIFinishReason:
    if reason is FinishReason.LENGTH:
        return "length"
    if isinstance(stop_reason, str):
        return "stop_sequence"
    return "eos_token"


def tgi_token_frame(
    index: int, token_id: int, text: str, logprob: float | None, special: bool
) -> bytes:
    """`data: {StreamResponse}` for a token that is not the last one and carries no top
    tokens, from a template (a pydantic event costs ~5 us; tests/perf_http checks that
    both parse to the same JSON). `logprob` is finite or None."""
    token = (
        f'{{"id":{int(token_id)},"text":{json_string(text)},'
        f'"logprob":{"null" if logprob is None else repr(float(logprob))},'
        f'"special":{"true" if special else "false"}}}'
    )
    return (
        f'data: {{"index":{int(index)},"token":{token},'
        '"top_tokens":null,"generated_text":null,"details":null}\n\n'
    ).encode()


class TGIDialect(Dialect):
    id_prefix = "gen"
    priority_param = "parameters.priority"

    @staticmethod
    def requested_priority(body: GenerateRequest) -> int | None:
        return body.parameters.priority

    def __init__(self, body: GenerateRequest, serving: Serving, request_id: str, stream: bool):
        prompt, params = tgi_inputs(body, serving.limits, serving.tokenizer)
        parameters = body.parameters
        if parameters.decoder_input_details and stream:
            raise invalid_request(  # as TGI
                "`parameters.decoder_input_details` is not supported when streaming tokens",
                param="parameters.decoder_input_details",
            )
        super().__init__(request_id, [prompt], [params], 1, stream)
        self.constraint = tgi_grammar_constraint(parameters.grammar)
        self.tokenizer = serving.tokenizer
        self.text_prefix = body.inputs if parameters.return_full_text else ""
        self.want_details = bool(parameters.details)
        self.num_top_tokens = parameters.top_n_tokens or 0
        self.seed = None if params.greedy else params.seed
        self.num_events = 0
        self.text = ""  # everything generated so far
        self.carry = ""  # text not yet attached to a token
        self.last_token_id = 0

    def _token(self, token_id: int, text: str, logprob: float | None) -> TGIToken:
        return TGIToken(
            id=token_id,
            text=text,
            logprob=None if logprob is None else finite(logprob),
            special=self.tokenizer.is_special(token_id),
        )

    def _top_tokens(self, entry: TokenLogprob | None) -> list[TGIToken]:
        if entry is None:
            return []
        return [self._token(token_id, text, logprob) for token_id, text, logprob in entry.top]

    def render_delta(self, _index: int, delta: TokenDelta) -> Iterable[bytes]:
        self.text += delta.text
        ids = delta.token_ids
        if not ids:
            if delta.finished:
                token = self._token(self.last_token_id, self.carry + delta.text, None)
                yield self._event(token.model_copy(update={"special": True}), None, delta)
            else:
                self.carry += delta.text
            return
        for position, token_id in enumerate(ids):
            last = position == len(ids) - 1
            entry = delta.logprobs[position] if position < len(delta.logprobs) else None
            text = self.carry + delta.text if last else ""
            if last:
                self.carry = ""
            self.last_token_id = token_id
            logprob = entry.logprob if entry else None
            final = delta if last and delta.finished else None
            if final is None and not self.num_top_tokens:  # the common case: a template
                self.num_events += 1
                special = self.tokenizer.is_special(token_id)
                logprob = None if logprob is None else finite(logprob)
                yield tgi_token_frame(self.num_events, token_id, text, logprob, special)
                continue
            token = self._token(token_id, text, logprob)
            top = self._top_tokens(entry) if self.num_top_tokens else None
            yield self._event(token, top, final)

    def _event(
        self, token: TGIToken, top: list[TGIToken] | None, final: TokenDelta | None
    ) -> bytes:
        self.num_events += 1
        details = None
        if final is not None:
            details = StreamDetails(
                finish_reason=tgi_finish_reason(final.finish_reason, final.stop_reason),
                generated_tokens=final.usage.completion_tokens if final.usage else self.num_events,
                seed=self.seed,
                input_length=len(self.prompts[0]),
            )
        return sse_event(
            StreamResponse(
                index=self.num_events,
                token=token,
                top_tokens=top,
                generated_text=None if final is None else self.text_prefix + self.text,
                details=details,
            )
        )

    def render_final(self, results: list[ChoiceResult], usage: Usage) -> GenerateResponse:
        result = results[0]
        details = self._details(result) if self.want_details else None
        return GenerateResponse(generated_text=self.text_prefix + result.text, details=details)

    def _prefill(self, result: ChoiceResult) -> list[TGIToken]:
        """`decoder_input_details`: each input token and its logprob (the first: null)."""
        if not result.prompt_logprobs:
            return []
        return [
            self._token(token_id, self.tokenizer.token_text(token_id), None)
            if entry is None
            else self._token(token_id, entry.text, entry.logprob)
            for token_id, entry in zip(self.prompts[0], result.prompt_logprobs)
        ]

    def _details(self, result: ChoiceResult) -> GenerateDetails:
        tokens, top_tokens = [], []
        for position, token_id in enumerate(result.token_ids):
            entry = result.logprobs[position] if position < len(result.logprobs) else None
            text = entry.text if entry else self.tokenizer.token_text(token_id)
            tokens.append(self._token(token_id, text, entry.logprob if entry else None))
            top_tokens.append(self._top_tokens(entry))
        return GenerateDetails(
            finish_reason=tgi_finish_reason(result.finish_reason, result.stop_reason),
            generated_tokens=result.num_tokens,
            seed=self.seed,
            prefill=self._prefill(result),
            tokens=tokens,
            top_tokens=top_tokens if self.num_top_tokens else None,
        )
