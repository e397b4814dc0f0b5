"""TGI-native routes: /generate, /generate_stream, / (either, by `stream`), /info.

huggingface_hub's InferenceClient.text_generation speaks this dialect. Streams send one
event per token; the last one also carries `generated_text` and `details`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import APIRouter, Request

from app import __version__
from app.api.deps import ServingDep, StateDep
from app.api.errors import ERROR_RESPONSES, invalid_request
from app.api.generation import ChoiceResult, Generation, new_request_id, unless_disconnected
from app.api.openai_format import finite
from app.api.params import fit_to_context, tgi_params, with_max_tokens
from app.api.schemas_tgi import (
    GenerateDetails,
    GenerateRequest,
    GenerateResponse,
    Info,
    StreamDetails,
    StreamResponse,
    TGIFinishReason,
    TGIToken,
)
from app.api.sse import EventStreamResponse, pump_events, sse_event
from app.api.state import Serving
from app.api.stream_frames import tgi_token_frame
from app.core import FinishReason, SamplingParams, TokenDelta, TokenLogprob
from app.tokenizer import Tokenizer

router = APIRouter(tags=["TGI"])

TGI_ERROR_EXTRA = {"error_type": "generation"}


@dataclass
class TGIJob:
    """A validated TGI request, its engine generation and what the answer needs."""

    generation: Generation
    params: SamplingParams
    text_prefix: str  # the input when return_full_text, else ""
    input_length: int  # prompt tokens after truncation
    want_details: bool
    num_top_tokens: int


def _start(body: GenerateRequest, serving: Serving) -> TGIJob:
    parameters = body.parameters
    params = tgi_params(parameters, serving.limits)
    prompt = serving.tokenizer.encode(body.inputs)
    if not prompt:
        raise invalid_request("`inputs` is empty: it must hold at least one token", "inputs")
    if parameters.truncate is not None:
        prompt = prompt[-parameters.truncate :]
    max_tokens = fit_to_context(
        len(prompt),
        params.max_tokens,
        serving.limits,
        prompt_param="inputs",
        max_tokens_param="parameters.max_new_tokens",
    )
    params = with_max_tokens(params, max_tokens)
    generation = Generation(serving.engine, new_request_id("gen"), [prompt], [params], n=1)
    return TGIJob(
        generation=generation,
        params=params,
        text_prefix=body.inputs if parameters.return_full_text else "",
        input_length=len(prompt),
        want_details=bool(parameters.details),
        num_top_tokens=parameters.top_n_tokens or 0,
    )


def tgi_finish_reason(
    reason: FinishReason | None, stop_reason: str | int | None
) -> TGIFinishReason:
    if reason is FinishReason.LENGTH:
        return "length"
    if isinstance(stop_reason, str):
        return "stop_sequence"
    return "eos_token"


def _token(token_id: int, text: str, logprob: float | None, tokenizer: Tokenizer) -> TGIToken:
    return TGIToken(
        id=token_id,
        text=text,
        logprob=None if logprob is None else finite(logprob),
        special=tokenizer.is_special(token_id),
    )


def _top_tokens(entry: TokenLogprob | None, tokenizer: Tokenizer) -> list[TGIToken]:
    if entry is None:
        return []
    return [_token(token_id, text, logprob, tokenizer) for token_id, text, logprob in entry.top]


def _seed(params: SamplingParams) -> int | None:
    return None if params.greedy else params.seed


def _details(job: TGIJob, result: ChoiceResult, tokenizer: Tokenizer) -> GenerateDetails:
    tokens, top_tokens = [], []
    for position, token_id in enumerate(result.token_ids):
        entry = result.logprobs[position] if position < len(result.logprobs) else None
        text = entry.text if entry else tokenizer.token_text(token_id)
        tokens.append(_token(token_id, text, entry.logprob if entry else None, tokenizer))
        top_tokens.append(_top_tokens(entry, tokenizer))
    generated = result.usage.completion_tokens if result.usage else len(result.token_ids)
    return GenerateDetails(
        finish_reason=tgi_finish_reason(result.finish_reason, result.stop_reason),
        generated_tokens=generated,
        seed=_seed(job.params),
        tokens=tokens,
        top_tokens=top_tokens if job.num_top_tokens else None,
    )


async def _generate(body: GenerateRequest, request: Request, serving: Serving) -> GenerateResponse:
    job = _start(body, serving)
    try:
        results = await unless_disconnected(request, job.generation.collect())
    finally:
        await job.generation.aclose()
    result = results[0]
    details = _details(job, result, serving.tokenizer) if job.want_details else None
    return GenerateResponse(generated_text=job.text_prefix + result.text, details=details)


class TokenEvents:
    """Renders engine deltas as TGI stream events: one per token, details on the last.

    A delta's text goes on its last token (the text of a token is what it added to the
    output). Text that arrives without a token is carried to the next token; a choice
    that ends without a new token closes with an empty special token.
    """

    def __init__(self, job: TGIJob, tokenizer: Tokenizer) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.num_events = 0
        self.text = ""  # everything generated so far
        self.carry = ""  # text not yet attached to a token
        self.last_token_id = 0

    def render(self, _index: int, delta: TokenDelta) -> Iterable[bytes]:
        self.text += delta.text
        ids = delta.token_ids
        if not ids:
            if delta.finished:
                token = _token(self.last_token_id, self.carry + delta.text, None, self.tokenizer)
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
            if final is None and not self.job.num_top_tokens:  # the common case: a template
                self.num_events += 1
                special = self.tokenizer.is_special(token_id)
                logprob = None if logprob is None else finite(logprob)
                yield tgi_token_frame(self.num_events, token_id, text, logprob, special)
                continue
            token = _token(token_id, text, logprob, self.tokenizer)
            top = _top_tokens(entry, self.tokenizer) if self.job.num_top_tokens else None
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
                seed=_seed(self.job.params),
                input_length=self.job.input_length,
            )
        return sse_event(
            StreamResponse(
                index=self.num_events,
                token=token,
                top_tokens=top,
                generated_text=None if final is None else self.job.text_prefix + self.text,
                details=details,
            )
        )


def _stream(body: GenerateRequest, serving: Serving) -> EventStreamResponse:
    job = _start(body, serving)
    renderer = TokenEvents(job, serving.tokenizer)
    events = pump_events(
        job.generation, serving.keepalive_interval_s, renderer.render, error_extra=TGI_ERROR_EXTRA
    )
    return EventStreamResponse(events)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=ERROR_RESPONSES,
    summary="Generate text (TGI)",
)
async def generate(body: GenerateRequest, request: Request, serving: ServingDep):
    return await _generate(body, request, serving)


@router.post(
    "/generate_stream",
    response_model=StreamResponse,
    responses=ERROR_RESPONSES,
    summary="Generate text as server-sent events, one per token (TGI)",
)
async def generate_stream(body: GenerateRequest, serving: ServingDep):
    return _stream(body, serving)


@router.post(
    "/",
    response_model=list[GenerateResponse],
    responses=ERROR_RESPONSES,
    summary="TGI compatibility: /generate (as a one-item list) or /generate_stream by `stream`",
)
async def compat_generate(body: GenerateRequest, request: Request, serving: ServingDep):
    if body.stream:
        return _stream(body, serving)
    return [await _generate(body, request, serving)]


@router.get("/info", response_model=Info, summary="Served model and limits (TGI)")
async def info(serving: ServingDep, state: StateDep) -> Info:
    settings = state.settings
    return Info(
        model_id=serving.model.name,
        model_dtype=serving.model.dtype,
        model_device_type=serving.model.device,
        max_concurrent_requests=settings.max_num_seqs + settings.max_queued,
        max_stop_sequences=serving.limits.max_stop_sequences,
        max_input_tokens=serving.limits.max_prompt_tokens,
        max_total_tokens=serving.limits.max_model_len,
        version=__version__,
    )
