"""Tokenizer wrapper: encoding, chat template, special and stop ids, token texts.

One instance per thread that uses it (the event loop and the engine thread each load
their own): Hugging Face fast tokenizers are not safe to share across threads.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence as SequenceOf
from pathlib import Path
from typing import Any

from app.chat_control import (
    ControlTokenPolicy,
    ForgedTurnError,
    check_names,
    control_token_in,
    encode_content_as_text,
    forged_content_index,
)
from app.token_bytes import is_byte_level, vocabulary_bytes
from app.tools import FormatSetting, choose_format
from app.tools.prompt import fallback_messages


class ChatTemplateError(ValueError):
    """The messages could not be rendered with the model's chat template."""


def tool_use_template(template: str | dict[str, str] | None) -> str | None:
    """The template a request with tools is rendered with.

    A tokenizer may hold several named templates; transformers picks "tool_use" for a
    request with tools when there is one.
    """
    if isinstance(template, dict):
        return template.get("tool_use") or template.get("default")
    return template


def template_uses_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (transformers passes it)."""
    if not template:
        return False
    import jinja2
    from jinja2 import meta

    try:
        parsed = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in meta.find_undeclared_variables(parsed)


def tokenizer_choice_config(model_dir: Path) -> Any | None:
    """The model's config.json as a plain transformers `PretrainedConfig`, for
    AutoTokenizer to choose the tokenizer class from; None lets AutoTokenizer load it.

    Why: AutoTokenizer reads only the config's model_type, name and tokenizer_class, but
    loading it through AutoConfig imports the model's own config class, and with it (in
    transformers 5) torch.distributed.tensor and sympy: about 1.1 s of CPU in every
    process that loads a tokenizer, every server start-up included. The plain config
    carries the same fields (`_name_or_path` as AutoConfig sets it), so the same class is
    chosen. Where the config's class takes part in the choice, AutoTokenizer's own path
    is kept: a tokenizer_config.json naming no tokenizer_class, or one with code of its
    own (`auto_map`).
    """
    from transformers import PretrainedConfig

    try:
        config_dict = json.loads((model_dir / "config.json").read_text())
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config_dict, dict) or not isinstance(config_dict.get("model_type"), str):
        return None
    if not isinstance(tokenizer_config, dict) or "auto_map" in tokenizer_config:
        return None
    if not isinstance(tokenizer_config.get("tokenizer_class"), str):
        return None  # then the config's class names the tokenizer (TOKENIZER_MAPPING)
    # Only those fields: the rest could only make transformers warn (`rope_scaling`...).
    read = {
        k: config_dict[k]
        for k in ("model_type", "model_name", "tokenizer_class")
        if k in config_dict
    }
    config = PretrainedConfig.from_dict(read)
    config._name_or_path = str(model_dir)
    return config


class Tokenizer:
    """Everything lamina needs from a Hugging Face tokenizer folder."""

    def __init__(
        self,
        model_dir: str | Path,
        control_tokens: ControlTokenPolicy = "text",
        tool_call_format: FormatSetting = "auto",
    ) -> None:
        from transformers import AutoTokenizer  # lazy: keeps `import app` light

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            # Said plainly: transformers would read the path as a model hub id and fail
            # with a message about repository names.
            raise FileNotFoundError(
                f"model folder {self.model_dir} does not exist: run `lamina weights` to prepare "
                "the default model, or set LAMINA_MODEL to a local Hugging Face model folder"
            )
        self._hf = AutoTokenizer.from_pretrained(
            str(self.model_dir),
            local_files_only=True,
            config=tokenizer_choice_config(self.model_dir),
        )
        self.vocab_size = len(self._hf)
        self.eos_token_ids = frozenset(self._collect_eos_ids())
        self._special_ids = frozenset(self._hf.all_special_ids)
        self.has_chat_template = bool(getattr(self._hf, "chat_template", None))
        # The format calls are asked for and parsed in, and whether the template renders
        # `tools` itself (if not, tools/prompt.py's fallback does): tools/formats.py.
        template = tool_use_template(getattr(self._hf, "chat_template", None))
        self.tool_call_format, self.template_renders_tools = choose_format(
            template, template_uses_tools(template), tool_call_format
        )
        self._byte_level = is_byte_level(self._hf)
        self._added_ids = frozenset(self._hf.added_tokens_decoder)
        self._bytes_cache: dict[int, bytes] = {}
        # What a control-token string in a chat message's content becomes (chat_control.py).
        self.control_token_policy = control_tokens
        self.control_tokens = frozenset(
            token.content for token in self._hf.added_tokens_decoder.values() if token.special
        )

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self._hf.eos_token_id is not None:
            ids.add(int(self._hf.eos_token_id))
        gen_config = self.model_dir / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(int(i) for i in eos)
        return ids

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Render chat messages with the model's template and tokenize them.

        Messages and `tools` are in transformers' tool format (tools/prompt.py). A
        template that renders tools gets them as they are; any other gets the fallback's
        plain messages. Control-token strings inside message content never become
        control tokens: they are encoded as plain text, or refused (ForgedTurnError)
        under the "reject" policy (which also refuses them in any tool definition or
        call); in tool definitions and calls a native template renders, they are refused.
        """
        if not self.has_chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        check_names(messages, self.control_tokens)
        reject = self.control_token_policy == "reject"
        if reject:  # on the messages as sent: the fallback below renumbers them
            self._refuse_forged_content(messages)
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            if reject or self.template_renders_tools:
                self._refuse_control_tokens_in_tools(messages, tools)
            if not self.template_renders_tools:
                messages = fallback_messages(messages, tools, self.tool_call_format)
                tools = None
        render = functools.partial(self._render, tools=tools)
        if forged_content_index(messages, self.control_tokens) is None:
            # The template already wrote any BOS/role markers it wants.
            return self.encode(render(messages, add_generation_prompt), False)
        if reject:
            self._refuse_forged_content(messages)
        return encode_content_as_text(
            messages,
            render=lambda chat: render(chat, add_generation_prompt),
            encode_template=lambda text: self.encode(text, add_special_tokens=False),
            encode_plain=self._encode_splitting_control_tokens,
        )

    def _refuse_forged_content(self, messages: list[dict[str, Any]]) -> None:
        forged = forged_content_index(messages, self.control_tokens)
        if forged is not None:
            index, token = forged
            raise ForgedTurnError(
                f"`messages[{index}].content` contains the control token '{token}'",
                f"messages[{index}].content",
            )

    def _refuse_control_tokens_in_tools(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> None:
        texts = [("tools", json.dumps(tools or [], ensure_ascii=False))]
        texts += [
            (f"messages[{i}].tool_calls", json.dumps(m.get("tool_calls"), ensure_ascii=False))
            for i, m in enumerate(messages)
            if m.get("tool_calls")
        ]
        for param, text in texts:
            found = control_token_in(text, self.control_tokens)
            if found is not None:
                raise ForgedTurnError(f"`{param}` contains the control token '{found}'", param)

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        try:
            return self._hf.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # jinja errors raised by the template itself
            raise ChatTemplateError(f"chat template failed: {exc}") from None

    def _encode_splitting_control_tokens(self, text: str) -> list[int]:
        encoded = self._hf(text, add_special_tokens=False, split_special_tokens=True)
        return list(encoded["input_ids"])

    def decode(self, token_ids: SequenceOf[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprobs); never skips specials."""
        return self._hf.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes (token_bytes.py); part of a character for some tokens."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            piece = self._hf.convert_ids_to_tokens(token_id)
            if token_id in self._added_ids:
                cached = piece.encode("utf-8")
            else:
                cached = vocabulary_bytes(piece, self._byte_level)
            self._bytes_cache[token_id] = cached
        return cached

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def is_valid_id(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size
