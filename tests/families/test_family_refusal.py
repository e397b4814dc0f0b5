"""A model of an architecture lamina does not run is refused at start-up in one log line
that lists what it runs: no traceback, and the server does not become ready."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from app.config import Settings
from app.main import create_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_unsupported_architecture_is_one_line(family_model_paths, tmp_path, log_lines):
    folder = tmp_path / "mixtral"
    shutil.copytree(family_model_paths["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MixtralForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    reasons: list[str] = []
    app = create_app(Settings(model=folder, device="cpu"), on_fatal=reasons.append)
    async with app.router.lifespan_context(app):
        for _ in range(1000):
            if reasons:
                break
            await asyncio.sleep(0.01)
    (reason,) = reasons
    assert "unsupported architecture 'MixtralForCausalLM'" in reason
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    errors = [r for r in records if r.get("level") in ("error", "ERROR")]
    assert len(errors) == 1, errors
    text = json.dumps(errors[0])
    assert "Traceback" not in text and "\\n" not in errors[0]["message"]
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert name in errors[0]["message"]
