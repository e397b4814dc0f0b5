"""Tiny random models of each native family (transformers writes them, offline), with
the default model's tokenizer, and an engine runner over each.

Every family's peculiarity is switched on: Qwen2's q/k/v biases (and a tied head, as
its small checkpoints have), Qwen3's per-head q/k norms (with a head_dim of its own),
Mistral with and without a sliding window shorter than the prompts, Phi-3's merged
q/k/v and gate/up weights (with a window of 20), Gemma 2 and 3 (GeGLU, four (1 + weight)
norms a layer, scaled embeddings, query_pre_attn_scalar, local layers with a window
shorter than the prompts between global ones; Gemma 2 tied, with both soft-caps low
enough to bend its scores and logits; Gemma 3 with q/k norms, a local rope base of its
own and linear rope scaling on its global layer).

Two architectures lamina has no code for run through the generic backend (transformers'
modules, lamina's paged attention): OLMo 2 (norms after each sublayer, q/k norms over
whole projections) and Granite (its embedding, residual, attention and logit
multipliers all set away from 1, so transformers' own head must run).
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
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=32,
            tie_word_embeddings=True,
            sliding_window=SLIDING_WINDOW,  # layers 0 and 2; layer 1 is global
            query_pre_attn_scalar=24,
            attn_logit_softcapping=0.5,  # the tiny model's scores reach past it
            final_logit_softcapping=1.0,  # its logits too
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=32,
            sliding_window=SLIDING_WINDOW,
            sliding_window_pattern=3,  # layers 0 and 1 local, layer 2 global
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
}
GENERIC_MODELS = {
    "olmo2": ("Olmo2Config", dict()),
    "granite": (
        "GraniteConfig",
        dict(
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=4.0,
        ),
    ),
}
FAMILY_MODELS.update(GENERIC_MODELS)
# Families the fused native stack does not run (their layers run one op at a time).
UNFUSED_FAMILIES = frozenset(GENERIC_MODELS)
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
