"""OpenAI request fields lamina does not implement: refused by name, never dropped.

A client that asks for a JSON schema or a tool call and gets free text fails far from
the cause, so such a field is a 400 naming it, unless its value asks for what lamina
does anyway (`tool_choice: "none"`). `response_format`, `guided_*`
and `structured_outputs` are implemented (constraints.py); `tools`, `tool_choice` and
`parallel_tool_calls` are fields of chat requests (tool_calls.py), so they reach this
list only on /v1/completions.
vLLM's extensions that would change the prompt or the output are refused the same way.
OpenAI's bookkeeping fields (`metadata`, `store`, `service_tier`, ...) and anything else
unknown (a vendor extension) are ignored and logged at debug level
(schemas.LaminaRequest)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from app.api.errors import invalid_request

_TOOLS = "tool calling is available on /v1/chat/completions only"
_FUNCTIONS = "the legacy function-calling fields are not supported; send `tools`"
_TEMPLATE = "the prompt is the model's own chat template, rendered as it is"
_TOKEN_IDS = "tokens are returned as text (`/tokenize` gives their ids)"


def _never(_value: Any) -> bool:
    return False


# field -> (is this value what lamina does anyway?, why the field is refused)
NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda value: value == [], _TOOLS),
    "tool_choice": (lambda value: value == "none", _TOOLS),
    "functions": (lambda value: value == [], _FUNCTIONS),
    "function_call": (lambda value: value == "none", _FUNCTIONS),
    "audio": (_never, "audio output is not supported"),
    "modalities": (lambda value: value == ["text"], "only text output is supported"),
    "prediction": (_never, "predicted outputs are not supported"),
    "web_search_options": (_never, "web search is not supported"),
    "suffix": (_never, "insertion (`suffix`) is not supported"),
    "best_of": (lambda value: value in (None, 1), "best-of is not supported (must be 1)"),
    "reasoning_effort": (_never, "this server runs no reasoning model"),
    # vLLM's extensions that change the prompt or the output (vLLM clients send them; the
    # ones lamina implements are fields of schemas.py). Their default values pass.
    "use_beam_search": (lambda value: value is False, "beam search is not supported"),
    "length_penalty": (lambda value: value == 1, "beam search is not supported"),
    "truncate_prompt_tokens": (_never, "prompts are never truncated here; shorten the prompt"),
    "allowed_token_ids": (_never, "restricting the vocabulary is not supported; use `logit_bias`"),
    "bad_words": (lambda value: value == [], "banned words are not supported; use `logit_bias`"),
    "echo": (lambda value: value is False, "`echo` is a field of /v1/completions only"),
    "continue_final_message": (lambda value: value is False, _TEMPLATE),
    "chat_template": (_never, _TEMPLATE),
    "chat_template_kwargs": (lambda value: value == {}, _TEMPLATE),
    "documents": (lambda value: value == [], _TEMPLATE),
    "mm_processor_kwargs": (lambda value: value == {}, "only text input is supported"),
    "structural_tag": (_never, "send `response_format` or `structured_outputs`"),
    "guided_whitespace_pattern": (_never, "JSON is always written compactly"),
    "logits_processors": (lambda value: value == [], "custom logits processors are not supported"),
    "return_tokens_as_token_ids": (lambda value: value is False, _TOKEN_IDS),
    "return_token_ids": (lambda value: value is False, _TOKEN_IDS),
    "cache_salt": (_never, "the prefix cache is shared by every request; it takes no salt"),
    "vllm_xargs": (lambda value: value == {}, "vLLM's extra arguments are not supported"),
}

# The embedding routes (/v1/embeddings and TGI's /embed): vLLM's and text-embeddings-
# inference's fields that would change a vector.
EMBEDDINGS_NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "truncate_prompt_tokens": (
        _never,
        "inputs are not cut to a token count (TGI's /embed takes `truncate`)",
    ),
    "prompt_name": (_never, "prompts of a sentence-transformers config are not prepended"),
    "truncation_direction": (
        lambda value: value in ("Right", "right"),
        "`truncate` keeps an input's start (Right) only",
    ),
}

# POST /v1/responses: the request fields of OpenAI's Responses API that lamina does not
# run. Input items and parts (images, files, audio, reasoning) and built-in tools are
# refused by responses_input.py, which names the item.
RESPONSES_NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "reasoning": (lambda value: value == {}, "this server runs no reasoning model"),
    "include": (lambda value: value == [], "no extra output (`include`) is available"),
    "background": (lambda value: value is False, "background responses are not supported"),
    "conversation": (_never, "conversations are not stored; send `previous_response_id`"),
    "prompt": (_never, "stored prompt templates are not supported"),
    "top_logprobs": (lambda value: value == 0, "log-probabilities are not returned here"),
    "truncation": (lambda value: value == "disabled", 'only "disabled" is supported'),
    "max_tool_calls": (_never, "a limit on tool calls is not supported"),
    "prompt_cache_retention": (_never, "the prefix cache has no retention setting"),
}

# `stream_options` of the OpenAI routes: vLLM's option that would change the stream.
STREAM_OPTIONS_NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "continuous_usage_stats": (
        lambda value: value is False,
        "usage is sent once, in a last chunk (`include_usage`)",
    ),
}


def refuse_unimplemented(
    extra_fields: Mapping[str, Any] | None,
    rules: Mapping[str, tuple[Callable[[Any], bool], str]] = NOT_IMPLEMENTED,
    within: str = "",
) -> None:
    """400 for the first field of `rules` whose value asks for something new (`within`:
    the object holding the fields, as in `stream_options.`)."""
    for name, value in (extra_fields or {}).items():
        rule = rules.get(name)
        if rule is not None and value is not None and not rule[0](value):
            param = within + name
            raise invalid_request(
                f"`{param}` is not supported: {rule[1]}", param=param, code="unsupported_field"
            )
