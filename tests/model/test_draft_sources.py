"""What LAMINA_SPECULATIVE_MODEL may name, at the start-up of the real app: what
LAMINA_MODEL may (here a .gguf file, served as the draft), and a draft lamina cannot use
is refused before the served model loads, in one line that names
LAMINA_SPECULATIVE_MODEL (not LAMINA_MODEL) and says what would work."""

from __future__ import annotations

import pytest

from tests.model.gguf_writer import write_gguf
from tests.model.helpers import copy_with_another_vocabulary
from tests.model.serving import greedy, refusal, served

pytestmark = pytest.mark.anyio
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
DRAFT = dict(speculative="draft", speculative_max_batch=64)


async def test_a_missing_draft_folder_is_one_line_naming_its_setting(
    tiny_model_path, tmp_path, log_lines
):
    absent = tmp_path / "absent"
    message = await refusal(tiny_model_path, log_lines, speculative_model=absent, **DRAFT)
    assert f"model folder {absent} does not exist" in message
    assert "set LAMINA_SPECULATIVE_MODEL to a Hugging Face folder, a .gguf file" in message
    assert "LAMINA_MODEL " not in message and "lamina weights" not in message


async def test_a_draft_folder_without_config_json_is_one_line(tiny_model_path, tmp_path, log_lines):
    message = await refusal(tiny_model_path, log_lines, speculative_model=tmp_path, **DRAFT)
    assert f"the draft model {tmp_path} (LAMINA_SPECULATIVE_MODEL)" in message
    assert "config.json not found" in message
    assert "LAMINA_SPECULATIVE_MODEL may also name a .gguf file" in message


async def test_a_draft_with_another_vocabulary_is_one_line(tiny_model_path, tmp_path, log_lines):
    folder = copy_with_another_vocabulary(tiny_model_path, tmp_path / "other-vocabulary")
    message = await refusal(tiny_model_path, log_lines, speculative_model=folder, **DRAFT)
    assert "does not share the served model's tokenizer" in message
    assert "LAMINA_SPECULATIVE_MODEL must name a model with the same vocabulary" in message


async def test_a_gguf_draft_drafts_and_changes_no_token(tiny_model_path, tmp_path, gguf_cache):
    # The tiny model drafting for itself from a GGUF file (its tokenizer from the file's
    # metadata: another tokenizer.json with the same vocabulary).
    draft = write_gguf(tiny_model_path, tmp_path / "tiny.gguf")
    async with served(tiny_model_path, speculative_model=draft, **DRAFT) as client:
        drafted, _ = await greedy(client, PROMPT, 12)
        metrics = (await client.get("/metrics")).text
    async with served(tiny_model_path) as client:
        plain, _ = await greedy(client, PROMPT, 12)
    assert drafted == plain
    (line,) = [x for x in metrics.splitlines() if x.startswith("lamina:spec_decode_num_drafts")]
    assert float(line.split()[-1]) > 0
