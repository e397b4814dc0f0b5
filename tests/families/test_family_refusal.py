"""A model lamina cannot run (not a decoder-only causal LM, or one whose attention does not
go through transformers' AttentionInterface) is refused at start-up in one log line that
lists what it runs: no traceback, and the server does not become ready. The start-up log
says which backend serves a model it does run."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.config import Settings
from app.main import create_app
from app.model.config import ModelLoadError
from app.model.families import read_model_config
from app.model.loader import load_model

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config_only_folder(tmp_path, config_class: str, architecture: str, **fields):
    """A folder holding just config.json: refusals come before any weight is read."""
    import transformers

    folder = tmp_path / architecture
    folder.mkdir()
    config = getattr(transformers, config_class)(**fields).to_dict()
    config["architectures"] = [architecture]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


async def test_a_non_causal_model_is_refused_in_one_line(tmp_path, log_lines):
    folder = _config_only_folder(tmp_path, "BertConfig", "BertForMaskedLM")
    reasons: list[str] = []
    app = create_app(Settings(model=folder, device="cpu"), on_fatal=reasons.append)
    async with app.router.lifespan_context(app):
        for _ in range(1000):
            if reasons:
                break
            await asyncio.sleep(0.01)
    (reason,) = reasons
    assert "unsupported architecture 'BertForMaskedLM'" in reason
    assert "BertForMaskedLM is not a causal LM" in reason
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    errors = [r for r in records if r.get("level") in ("error", "ERROR")]
    assert len(errors) == 1, errors
    text = json.dumps(errors[0])
    assert "Traceback" not in text and "\\n" not in errors[0]["message"]
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM", "generic backend"):
        assert name in errors[0]["message"]


@pytest.mark.parametrize(
    ("config_class", "architecture", "why"),
    [
        ("T5Config", "T5ForConditionalGeneration", "is an encoder-decoder model"),
        ("StableLmConfig", "StableLmForCausalLM", "does not route its attention through"),
    ],
)
def test_what_the_generic_backend_cannot_run_is_refused(tmp_path, config_class, architecture, why):
    folder = _config_only_folder(tmp_path, config_class, architecture)
    with pytest.raises(ModelLoadError, match=why):
        read_model_config(folder)


def test_start_up_says_which_backend_serves_the_model(family_model_paths, caplog):
    caplog.set_level("INFO")
    load_model(family_model_paths["qwen3"])
    load_model(family_model_paths["olmo2"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backend")]
    assert lines == [
        "backend: native (lamina's own Qwen3ForCausalLM code)",
        "backend: generic (transformers' Olmo2ForCausalLM modules, lamina's paged attention): "
        "lamina has no native implementation of Olmo2ForCausalLM",
    ]
