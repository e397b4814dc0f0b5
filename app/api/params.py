"""Request bodies -> engine inputs: prompt token ids and the frozen `SamplingParams`.

One entry per dialect (`completion_inputs`, `chat_inputs`, `tgi_inputs`) runs every
check of its request in order and returns what the engine runs. The pydantic models
already checked types and static ranges; this module checks what depends on the
settings (`Limits.settings`), the vocabulary and the prompt's length, and raises one
precise 400 per broken rule. Nothing raw goes further than here.
"""

from __future__ import annotations

import dataclasses

from app.api.errors import invalid_request
from app.api.prompts import check_token_ids, encode_chat, encode_prompt, named_prompts
from app.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from app.api.schemas_tgi import GenerateParameters, GenerateRequest
from app.api.state import Limits
from app.api.tool_calls import ToolRequest, checked_tools
from app.api.unimplemented import STREAM_OPTIONS_NOT_IMPLEMENTED, refuse_unimplemented
from app.core import SamplingParams
from app.tokenizer import Tokenizer

LOGIT_BIAS_RANGE = 100.0
# Float32 logits divided by a temperature this small overflow to inf (NaN probabilities),
# and sampling at it is argmax anyway: it is greedy, as in vLLM.
MIN_SAMPLING_TEMPERATURE = 1e-5
# Below this a repetition penalty overflows float32 logits; it means the same thing
# ("strongly prefer tokens already seen"), so smaller values are raised to it.
MIN_REPETITION_PENALTY = 1e-6
# A top_p that rounds to 0 in float32 would keep no token at all; this keeps the best one.
MIN_TOP_P = 1e-6


def sampling_temperature(value: float | None) -> float:
    if value is None:
        return 1.0
    return 0.0 if value < MIN_SAMPLING_TEMPERATURE else value


def repetition_penalty(value: float | None) -> float:
    return 1.0 if value is None else max(value, MIN_REPETITION_PENALTY)


def nucleus_top_p(value: float | None) -> float:
    return 1.0 if value is None else max(value, MIN_TOP_P)


def at_most(value: int | None, limit: int | None, param: str) -> int | None:
    """`value` when it is within the setting `limit` (None: no limit), else a 400."""
    if value is not None and limit is not None and value > limit:
        raise invalid_request(f"`{param}` must be at most {limit} (got {value})", param=param)
    return value


def check_stop(
    stop: str | list[str] | None, limits: Limits, param: str = "stop"
) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    max_stops, max_length = limits.settings.max_stop_sequences, limits.settings.max_stop_length
    if len(stops) > max_stops:
        raise invalid_request(
            f"`{param}` has {len(stops)} sequences; at most {max_stops} are allowed",
            param=param,
        )
    for index, text in enumerate(stops):
        if not text:
            raise invalid_request(f"`{param}[{index}]` is an empty string", param=param)
        if len(text) > max_length:
            raise invalid_request(
                f"`{param}[{index}]` is {len(text)} characters long; at most "
                f"{max_length} are allowed",
                param=param,
            )
    return tuple(stops)


def check_logit_bias(
    logit_bias: dict[str, float] | None, limits: Limits
) -> tuple[tuple[int, float], ...]:
    if not logit_bias:
        return ()
    max_entries = limits.settings.max_logit_bias
    if len(logit_bias) > max_entries:
        raise invalid_request(
            f"`logit_bias` has {len(logit_bias)} entries; at most {max_entries} are allowed",
            param="logit_bias",
        )
    entries = []
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise invalid_request(
                f"`logit_bias` key '{key}' is not a token id (an integer as a string)",
                param="logit_bias",
            ) from None
        if not 0 <= token_id < limits.vocab_size:
            raise invalid_request(
                f"`logit_bias` key {token_id} is outside the vocabulary [0, {limits.vocab_size})",
                param="logit_bias",
            )
        if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
            raise invalid_request(
                f"`logit_bias[{key}]` must be between -100 and 100 (got {bias})",
                param="logit_bias",
            )
        entries.append((token_id, float(bias)))
    return tuple(sorted(entries))


def fit_to_context(
    num_prompt_tokens: int,
    max_tokens: int | None,
    limits: Limits,
    *,
    prompt_param: str = "prompt",
    max_tokens_param: str = "max_tokens",
) -> int:
    """Check that the prompt, then prompt + max_tokens, fit; resolve an unset max_tokens.

    Unset becomes Settings.default_max_tokens, capped by Settings.max_tokens_limit and by
    what the context window leaves after the prompt.
    """
    cap = limits.settings.max_tokens_limit
    if num_prompt_tokens > limits.max_prompt_tokens:
        raise invalid_request(
            f"`{prompt_param}` is {num_prompt_tokens} tokens; at most "
            f"{limits.max_prompt_tokens} are allowed (context window: "
            f"{limits.max_model_len} tokens)",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = limits.max_model_len - num_prompt_tokens
    if max_tokens is None:  # a bounded default, so admission can weigh the request
        return min(limits.settings.default_max_tokens, cap or room, room)
    if max_tokens > room:
        raise invalid_request(
            f"`{prompt_param}` ({num_prompt_tokens} tokens) + `{max_tokens_param}` "
            f"({max_tokens}) = {num_prompt_tokens + max_tokens} tokens, more than the context "
            f"window of {limits.max_model_len} tokens; lower `{max_tokens_param}` to at most "
            f"{room}",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    return max_tokens


def _openai_params(
    body: SamplingFields,
    limits: Limits,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: int | None,
) -> SamplingParams:
    """The SamplingParams of both OpenAI routes, from the fields that mean the same on
    both; max_tokens is fitted to each prompt later."""
    if body.stop_token_ids:
        check_token_ids(body.stop_token_ids, "stop_token_ids", limits.vocab_size)
    logit_bias = check_logit_bias(body.logit_bias, limits)
    stop = check_stop(body.stop, limits)
    min_tokens = body.min_tokens or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid_request(
            f"`min_tokens` ({min_tokens}) must not exceed `{max_tokens_param}` ({max_tokens})",
            param="min_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=sampling_temperature(body.temperature),
        top_p=nucleus_top_p(body.top_p),
        top_k=body.top_k if body.top_k is not None and body.top_k > 0 else 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=repetition_penalty(body.repetition_penalty),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=logit_bias,
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        ignore_eos=bool(body.ignore_eos),
        min_tokens=min_tokens,
        skip_special_tokens=body.skip_special_tokens is not False,
        logprobs=logprobs,
    )


def with_prompt_logprobs(
    params: SamplingParams, body: SamplingFields, limits: Limits, echoed: int | None
) -> SamplingParams:
    """Ask the engine for prompt log-probabilities when the request wants them: vLLM's
    `prompt_logprobs`, or `echoed` (completions' `logprobs` with `echo`); the engine
    computes the larger top-N, each answer shows its own."""
    asked = at_most(body.prompt_logprobs, limits.settings.max_top_logprobs, "prompt_logprobs")
    wanted = [k for k in (asked, echoed) if k is not None]
    if not wanted:
        return params
    return dataclasses.replace(params, prompt_logprobs=max(wanted))


def with_max_tokens(params: SamplingParams, max_tokens: int | None) -> SamplingParams:
    if params.max_tokens == max_tokens:
        return params
    return dataclasses.replace(params, max_tokens=max_tokens)


def requested_max_tokens(body: CompletionRequest | ChatCompletionRequest) -> tuple[int | None, str]:
    """The output-token cap asked for, and its field: `max_completion_tokens`, the newer
    name, wins over `max_tokens` on both OpenAI routes."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return body.max_tokens, "max_tokens"


def refuse_unimplemented_fields(body: SamplingFields) -> None:
    """400 for a field of an OpenAI body, or of its `stream_options`, that lamina does not
    implement (unimplemented.py)."""
    refuse_unimplemented(body.model_extra)
    if body.stream_options is not None:
        refuse_unimplemented(
            body.stream_options.model_extra, STREAM_OPTIONS_NOT_IMPLEMENTED, "stream_options."
        )


def completion_inputs(
    body: CompletionRequest, limits: Limits, tokenizer: Tokenizer
) -> tuple[list[list[int]], list[SamplingParams], int]:
    """/v1/completions: the prompts, SamplingParams per prompt (max_tokens fitted to
    each), and n."""
    settings = limits.settings
    n = body.n or 1
    at_most(n, settings.max_n, "n")
    parts = named_prompts(body.prompt, "prompt", settings.max_prompts_per_request)
    refuse_unimplemented_fields(body)
    max_tokens, max_tokens_param = requested_max_tokens(body)
    at_most(max_tokens, settings.max_tokens_limit, max_tokens_param)
    logprobs = at_most(body.logprobs, settings.max_top_logprobs, "logprobs")
    params = _openai_params(body, limits, max_tokens, max_tokens_param, logprobs)
    # `echo` with `logprobs`: the prompt's tokens get theirs too, with the same top-N.
    echoed = logprobs if body.echo else None
    params = with_prompt_logprobs(params, body, limits, echoed)
    prompts = [encode_prompt(prompt, param, tokenizer) for param, prompt in parts]
    per_prompt = [
        with_max_tokens(
            params,
            fit_to_context(
                len(ids), max_tokens, limits, prompt_param=param, max_tokens_param=max_tokens_param
            ),
        )
        for ids, (param, _) in zip(prompts, parts)
    ]
    return prompts, per_prompt, n


def chat_inputs(
    body: ChatCompletionRequest, limits: Limits, tokenizer: Tokenizer
) -> tuple[list[list[int]], list[SamplingParams], int, ToolRequest]:
    """/v1/chat/completions: the chat template's prompt, its SamplingParams (one each),
    n, and the tools (checked; the prompt shows them)."""
    settings = limits.settings
    n = body.n or 1
    at_most(n, settings.max_n, "n")
    refuse_unimplemented_fields(body)
    max_tokens, max_tokens_param = requested_max_tokens(body)
    at_most(max_tokens, settings.max_tokens_limit, max_tokens_param)
    top_logprobs = at_most(body.top_logprobs, settings.max_top_logprobs, "top_logprobs")
    if top_logprobs is not None and not body.logprobs:
        raise invalid_request("`top_logprobs` requires `logprobs` to be true", param="top_logprobs")
    logprobs = (top_logprobs or 0) if body.logprobs else None
    params = _openai_params(body, limits, max_tokens, max_tokens_param, logprobs)
    if body.prompt_logprobs is not None and body.stream:
        raise invalid_request(
            "`prompt_logprobs` is not available when `stream` is true (as in vLLM)",
            param="prompt_logprobs",
        )
    params = with_prompt_logprobs(params, body, limits, None)
    tools = checked_tools(
        body.tools or [], body.tool_choice, body.parallel_tool_calls, tokenizer.tool_call_format
    )
    prompt = encode_chat(
        body.messages, tokenizer, body.add_generation_prompt is not False, tools.prompt_tools
    )
    fitted = fit_to_context(
        len(prompt), max_tokens, limits, prompt_param="messages", max_tokens_param=max_tokens_param
    )
    return [prompt], [with_max_tokens(params, fitted)], n, tools


# --- TGI ---------------------------------------------------------------------------------


def _reject_unsupported(parameters: GenerateParameters) -> None:
    def reject(name: str, why: str) -> None:
        raise invalid_request(f"`parameters.{name}` {why}", param=f"parameters.{name}")

    if parameters.best_of is not None and parameters.best_of > 1:
        reject("best_of", f"must be 1 (got {parameters.best_of}): best-of is not supported")
    if parameters.watermark:
        reject("watermark", "must be false: watermarking is not supported")
    if parameters.typical_p is not None and parameters.typical_p != 1.0:
        reject("typical_p", f"is not supported (got {parameters.typical_p})")
    if parameters.adapter_id:
        reject("adapter_id", "is not supported: this server has no adapters")


def tgi_inputs(
    body: GenerateRequest, limits: Limits, tokenizer: Tokenizer
) -> tuple[list[int], SamplingParams]:
    """The TGI routes: the prompt (after `truncate`) and its SamplingParams. Token
    logprobs are always on (TGI reports them)."""
    parameters = body.parameters
    _reject_unsupported(parameters)
    settings = limits.settings
    max_tokens = at_most(
        parameters.max_new_tokens, settings.max_tokens_limit, "parameters.max_new_tokens"
    )
    top_n = at_most(parameters.top_n_tokens, settings.max_top_logprobs, "parameters.top_n_tokens")
    sampling = bool(parameters.do_sample) or any(
        value is not None for value in (parameters.temperature, parameters.top_k, parameters.top_p)
    )
    temperature = sampling_temperature(parameters.temperature) if sampling else 0.0
    stop = check_stop(parameters.stop, limits, "parameters.stop")
    prompt = encode_prompt(body.inputs, "inputs", tokenizer)
    if parameters.truncate is not None:
        prompt = prompt[-parameters.truncate :]
    max_tokens = fit_to_context(
        len(prompt), max_tokens, limits,
        prompt_param="inputs", max_tokens_param="parameters.max_new_tokens",
    )  # fmt: skip
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=nucleus_top_p(parameters.top_p),
        top_k=parameters.top_k or 0,
        repetition_penalty=repetition_penalty(parameters.repetition_penalty),
        frequency_penalty=parameters.frequency_penalty or 0.0,
        seed=parameters.seed,
        stop=stop,
        logprobs=top_n or 0,
        # decoder_input_details: the prompt's tokens with their logprobs in details.prefill
        prompt_logprobs=0 if parameters.decoder_input_details else None,
    )
    return prompt, params
