"""Each family's chat template renders through `/tokenize` exactly as transformers'
`apply_chat_template` does.

The templates are written here in each family's turn format (no hub: the real ones are
not at hand offline), with the family's control tokens added to the default tokenizer
as special tokens, so that BOS, role headers, end-of-turn tokens and the generation
prompt all pass through lamina's chat path (control-token guard, encoding without
a second BOS) and must come out as transformers' ids.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.tokenizer import Tokenizer
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# family: (its control tokens, BOS, EOS, its template)
TEMPLATES = {
    "qwen2": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML),
    "qwen3": (
        ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        None,
        "<|im_end|>",
        CHATML.replace(
            "assistant\\n{% endif %}", "assistant\\n<think>\\n\\n</think>\\n\\n{% endif %}"
        ),
    ),
    "llama": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}"
        "<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}",
    ),
    "mistral": (
        ["<s>", "</s>", "[INST]", "[/INST]"],
        "<s>",
        "</s>",
        "{{ bos_token }}{% set system = messages[0].content if messages[0].role == 'system' "
        "else '' %}{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}"
        "[INST] {% if loop.last and system %}{{ system }}\n\n{% endif %}{{ m.content }}"
        " [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}",
    ),
    "phi3": (
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        None,
        "<|endoftext|>",
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}",
    ),
    "gemma": (
        ["<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<end_of_turn>",
        "{{ bos_token }}{% set system = messages[0].content + '\n\n' if messages[0].role == "
        "'system' else '' %}{% for m in messages if m.role != 'system' %}<start_of_turn>"
        "{{ 'model' if m.role == 'assistant' else m.role }}\n{% if loop.first %}{{ system }}"
        "{% endif %}{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    ),
}
CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is a paged KV cache?"},
    {"role": "assistant", "content": "  Blocks of keys and values, found through a table. "},
    {"role": "user", "content": "And prefix caching? <b>é</b> 日本"},
]


def family_tokenizer_folder(default_model_path: Path, folder: Path, family: str) -> Path:
    tokens, bos, eos, template = TEMPLATES[family]
    hf = AutoTokenizer.from_pretrained(default_model_path, local_files_only=True)
    hf.add_special_tokens({"additional_special_tokens": tokens})
    hf.bos_token, hf.eos_token = bos, eos
    hf.chat_template = template
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(params=sorted(TEMPLATES))
async def family_app(
    request, default_model_path: Path, tmp_path: Path
) -> AsyncIterator[tuple[str, FakeApp]]:
    folder = family_tokenizer_folder(default_model_path, tmp_path, request.param)
    engine = FakeEngine(Tokenizer(folder))
    async with running_fake_app(fake_settings(default_model_path), engine) as app:
        yield folder, app


async def test_tokenize_renders_as_transformers(family_app) -> None:
    folder, app = family_app
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cases = [(m, g) for m in (CONVERSATION, CONVERSATION[1:2]) for g in (True, False)]
    for messages, add_generation_prompt in cases:
        expected = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        response = await app.client.post("/tokenize", json=body)
        assert response.status_code == 200, response.text
        tokens = response.json()["tokens"]
        assert tokens == list(expected), hf.decode(tokens)
        if hf.bos_token:
            assert tokens.count(hf.bos_token_id) == 1  # the template's own, not a second
