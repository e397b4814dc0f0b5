"""A fake engine with the real Engine's contract, for HTTP-layer tests without a model.

It "generates" a fixed reply (tokenized with the real tokenizer) followed by EOS,
honouring max_tokens (0: the prompt only), stop strings, stop token ids, ignore_eos,
min_tokens, n and logprobs, and gives made-up prompt outputs (prompt_logprobs, a pooled
vector: `fake_embedding`) on each choice's first delta, so the routes' formatting can be
checked exactly. It records every request
and every abort, can be slowed down (keep-alive, disconnects), can fail or abort a
request whose prompt contains a marker, and can play dead.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from app.core import (
    FinishReason,
    PromptTokenLogprob,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    Usage,
)
from app.engine.engine import EngineDeadError
from app.engine.request_stream import RequestStream
from app.tokenizer import Tokenizer

DEFAULT_REPLY = " The quick brown fox jumps over the lazy dog. It was a sunny day."
FAKE_LOGPROB = -0.5


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int
    client: str = ""  # admission's client: whose work it is
    priority: int = 0
    finished: bool = False


@dataclass
class FakeEngine:
    tokenizer: Tokenizer
    max_model_len: int = 8192
    reply: str = DEFAULT_REPLY
    token_interval_s: float = 0.0
    fail_marker: str | None = "FAIL_IN_ENGINE"  # the request ends with ERROR after 1 token
    abort_marker: str | None = "ABORT_IN_ENGINE"  # ... with ABORT (shutdown, deadline)
    requests: list[FakeRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    alive: bool = True
    started: bool = False
    _producers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _streams: dict[str, RequestStream] = field(default_factory=dict)

    def start(self) -> None:
        self.started = True

    @property
    def is_alive(self) -> bool:
        return self.alive and self.started

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self.alive = False

    def abort(self, request_id: str, reason: str = "request aborted") -> None:
        """As Engine.abort: the stream ends at once with an ABORT delta carrying `reason`;
        finished or unknown requests are ignored."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self.aborted.append(request_id)
        self._producers.pop(request_id).cancel()
        stream.end(reason)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        log_request_id: str | None = None,
        client: str = "",
        priority: int = 0,
    ) -> RequestStream:
        """As Engine.add_request: the same RequestStream, fed by a task instead of a thread."""
        if not self.is_alive:
            raise EngineDeadError("fake engine is stopped")
        request = FakeRequest(request_id, list(prompt_token_ids), params, n, client, priority)
        self.requests.append(request)
        stream = RequestStream(request_id, n, self.abort)
        self._streams[request_id] = stream
        self._producers[request_id] = asyncio.ensure_future(self._feed(request, stream))
        return stream

    async def _feed(self, request: FakeRequest, stream: RequestStream) -> None:
        async for delta in _produce(self, request):
            stream.push(delta)
        request.finished = True
        self._streams.pop(request.request_id, None)
        self._producers.pop(request.request_id, None)

    @property
    def eos_id(self) -> int:
        return min(self.tokenizer.eos_token_ids)

    def reply_ids(self) -> list[int]:
        return self.tokenizer.encode(self.reply, add_special_tokens=False) + [self.eos_id]


@dataclass
class _Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text_sent: str = ""
    done: bool = False


def _logprob(engine: FakeEngine, token_id: int, k: int) -> TokenLogprob:
    alternatives = [t for t in engine.reply_ids() if t != token_id][:k]
    top = tuple(
        (t, engine.tokenizer.token_text(t), FAKE_LOGPROB - 1 - i)
        for i, t in enumerate(alternatives)
    )
    return TokenLogprob(token_id, engine.tokenizer.token_text(token_id), FAKE_LOGPROB, top)


def _step(engine: FakeEngine, request: FakeRequest, choice: _Choice, token_id: int) -> TokenDelta:
    params = request.params
    tokenizer = engine.tokenizer
    choice.token_ids.append(token_id)
    num_out = len(choice.token_ids)
    max_tokens = params.max_tokens or engine.max_model_len - len(request.prompt_token_ids)
    text = tokenizer.decode(choice.token_ids, skip_special_tokens=params.skip_special_tokens)
    finish, stop_reason = None, None
    for stop in params.stop:
        at = text.find(stop)
        if at >= 0 and num_out >= params.min_tokens:
            text = text[: at + (len(stop) if params.include_stop_str_in_output else 0)]
            finish, stop_reason = FinishReason.STOP, stop
            break
    ends = {engine.eos_id} if not params.ignore_eos else set()
    ends |= set(params.stop_token_ids)
    if finish is None and token_id in ends and num_out >= params.min_tokens:
        finish = FinishReason.STOP
        stop_reason = None if token_id == engine.eos_id else token_id
    if finish is None and num_out >= max_tokens:
        finish = FinishReason.LENGTH
    new_text = text[len(choice.text_sent) :]
    choice.text_sent = text
    logprobs = ()
    if params.logprobs is not None:
        logprobs = (_logprob(engine, token_id, params.logprobs),)
    usage = None
    if finish is not None:
        choice.done = True
        usage = Usage(len(request.prompt_token_ids), num_out)
    return TokenDelta(
        request.request_id,
        choice.index,
        new_text,
        (token_id,),
        logprobs,
        finish,
        stop_reason,
        usage,
    )


FAKE_HIDDEN_SIZE = 8


def fake_embedding(prompt_token_ids: list[int]) -> tuple[float, ...]:
    """The fake engine's pooled vector of a prompt: made up, but a function of the ids."""
    return tuple(
        float(sum((i + 1) * t for i, t in enumerate(prompt_token_ids)) % (97 + k) - 40)
        for k in range(FAKE_HIDDEN_SIZE)
    )


def _with_prompt_outputs(engine: FakeEngine, request: FakeRequest, delta: TokenDelta) -> TokenDelta:
    """A choice's first delta, with the prompt outputs its params ask for."""
    params, text_of = request.params, engine.tokenizer.token_text
    prompt_logprobs: tuple[PromptTokenLogprob | None, ...] = ()
    if params.prompt_logprobs is not None:
        prompt_logprobs = (None,) + tuple(
            PromptTokenLogprob(
                t, text_of(t), FAKE_LOGPROB, 1, _logprob(engine, t, params.prompt_logprobs).top
            )
            for t in request.prompt_token_ids[1:]
        )
    embedding = fake_embedding(request.prompt_token_ids) if params.pooling else None
    return dataclasses.replace(delta, prompt_logprobs=prompt_logprobs, embedding=embedding)


def _prompt_only(request: FakeRequest, index: int) -> TokenDelta:
    usage = Usage(len(request.prompt_token_ids), 0)
    return TokenDelta(request.request_id, index, "", (), (), FinishReason.LENGTH, usage=usage)


def _injected_failure(engine: FakeEngine, prompt_text: str) -> tuple[FinishReason, str] | None:
    if engine.fail_marker and engine.fail_marker in prompt_text:
        return FinishReason.ERROR, "injected failure"
    if engine.abort_marker and engine.abort_marker in prompt_text:
        return FinishReason.ABORT, "injected abort"
    return None


async def _produce(engine: FakeEngine, request: FakeRequest):
    reply = engine.reply_ids()
    if request.params.ignore_eos:
        reply = reply[:-1]
    prompt_text = engine.tokenizer.decode(request.prompt_token_ids)
    choices = [_Choice(index) for index in range(request.n)]
    step = 0
    while not all(choice.done for choice in choices):
        await asyncio.sleep(engine.token_interval_s)
        for choice in choices:
            if choice.done:
                continue
            failure = _injected_failure(engine, prompt_text)
            if failure is not None and step == 1:
                choice.done = True
                reason, message = failure
                yield TokenDelta(
                    request.request_id, choice.index, "", (), (), reason, error=message
                )
                continue
            if request.params.max_tokens == 0:
                choice.done = True
                delta = _prompt_only(request, choice.index)
            else:
                delta = _step(engine, request, choice, reply[step % len(reply)])
            yield _with_prompt_outputs(engine, request, delta) if step == 0 else delta
        step += 1
