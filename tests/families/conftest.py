"""Tiny random models of each native family (transformers writes them, offline), with
the default model's tokenizer, and an engine runner over each.

Every family's peculiarity is switched on: Qwen2's q/k/v biases (and a tied head, as
its small checkpoints have), Qwen3's per-head q/k norms (with a head_dim of its own),
Mistral with and without a sliding window shorter than the prompts, Phi-3's merged
q/k/v and gate/up weights (with a window of 20).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.engine.conftest import no_kv_block_left_referenced  # noqa: F401 - autouse here too
from tests.model.helpers import save_random_model

SLIDING_WINDOW = 12  # tokens: shorter than every prompt but the first, not a block multiple

# name -> (transformers config class, the family's fields)
FAMILY_MODELS = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "mistral_window": ("MistralConfig", dict(sliding_window=SLIDING_WINDOW)),
    "phi3": ("Phi3Config", dict(sliding_window=20)),
}
# Mistral without a window runs exactly LLaMA's code (tests/unit and tests/engine):
# the engine-level tests take the models whose code differs.
ENGINE_FAMILIES = sorted(set(FAMILY_MODELS) - {"mistral"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_family_model(out: Path, name: str, default_model_path: Path, **overrides) -> Path:
    """A 3-layer random model of family `name` with the default model's vocabulary."""
    config_class, fields = FAMILY_MODELS[name]
    fields = {**fields, **overrides}
    save_random_model(
        out,
        config_class,
        seed=7,
        vocab_size=49152,  # the default model's tokenizer
        num_hidden_layers=3,
        intermediate_size=128,
        max_position_embeddings=1024,
        pad_token_id=2,
        **fields,
    )
    for file in TOKENIZER_FILES:
        if (default_model_path / file).is_file():
            shutil.copy(default_model_path / file, out / file)
    return out


@pytest.fixture(scope="session")
def family_model_paths(tmp_path_factory, default_model_path) -> dict[str, Path]:
    """Every family's tiny model, written once per session on first use."""
    paths: dict[str, Path] = {}

    class Paths(dict):
        def __missing__(self, name: str) -> Path:
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            self[name] = save_family_model(out, name, default_model_path)
            return self[name]

    paths = Paths()
    return paths
