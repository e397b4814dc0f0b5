"""Each native family's logits equal transformers' within 1e-4 (fp32), through the paged
cache: prefill, chunked prefill, decode and a mixed batch, through the fused native
decoder stack, the native kernels one op at a time, and torch's ops."""

from __future__ import annotations

import pytest

from app.model.loader import load_model
from tests.families.conftest import (
    FAMILY_MODELS,
    SLIDING_WINDOW,
    UNFUSED_FAMILIES,
    save_family_model,
)
from tests.model.helpers import check_logits_parity

PATHS = {
    "fused": dict(kernels="auto", fused=True),
    "per_op": dict(kernels="auto", fused=False),
    "torch": dict(kernels="torch", fused=False),
}


FAMILY_PATHS = [
    (family, path)
    for family in sorted(FAMILY_MODELS)
    for path in sorted(PATHS)
    if not (path == "fused" and family in UNFUSED_FAMILIES)
]


@pytest.mark.parametrize(("family", "path"), FAMILY_PATHS)
def test_logits_match_transformers(family_model_paths, family, path, native):
    check_logits_parity(family_model_paths[family], **PATHS[path])


def test_the_family_differences_are_read(family_model_paths):
    qwen2, qwen3 = (load_model(family_model_paths[n]).config for n in ("qwen2", "qwen3"))
    assert (qwen2.architecture, qwen2.qkv_bias, qwen2.o_bias) == ("Qwen2ForCausalLM", True, False)
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias
    window = load_model(family_model_paths["mistral_window"]).config
    assert window.sliding_window == SLIDING_WINDOW
    assert load_model(family_model_paths["mistral"]).config.sliding_window is None
    phi3 = load_model(family_model_paths["phi3"]).config
    assert (phi3.architecture, phi3.sliding_window, phi3.qkv_bias) == ("Phi3ForCausalLM", 20, False)


def test_a_prompt_far_past_the_window(family_model_paths, native):
    """150 tokens through a 12-token window: most keys lie outside it."""
    check_logits_parity(family_model_paths["mistral_window"], prompt_len=150)


def test_start_up_says_which_path_the_layers_take(family_model_paths, native, caplog):
    caplog.set_level("INFO", logger="app.model.loader")
    load_model(family_model_paths["qwen3"])
    load_model(family_model_paths["qwen3"], kernels="torch")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoder")]
    assert lines == [
        "decoder layers: lamina's fused native stack, one call per step",
        "decoder layers: one op at a time: lamina's native CPU kernels are not in use "
        "(a GPU, kernels=torch, or no compiler)",
    ]


@pytest.mark.parametrize("kernel_family", ["auto", "torch"])
def test_yarn_rope_far_past_its_original_context(
    tmp_path, default_model_path, kernel_family, native
):
    """Qwen2.5's long-context setting (YaRN, factor 4) on positions up to 3x the original
    context: the blended frequencies and the temperature on cos and sin both count."""
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    yarn["original_max_position_embeddings"] = 32
    path = save_family_model(tmp_path, "qwen2", default_model_path, rope_parameters=yarn)
    assert load_model(path).config.rope_scaling.attention_factor > 1.1
    check_logits_parity(path, prompt_len=96, kernels=kernel_family)


@pytest.mark.parametrize(("served", "prompt_len"), [(1024, 96), (32, 32)], ids=["long", "short"])
@pytest.mark.parametrize("kernel_family", ["auto", "torch"])
def test_longrope_within_and_past_its_original_context(
    tmp_path, default_model_path, kernel_family, served, prompt_len, native
):
    """Phi-3's long-context rope (the 128k models, Phi-3.5): served past the original
    32 positions, the long factors on a 96-token prompt (transformers takes them for a
    sequence past 32); served within it, the short ones on a 32-token prompt."""
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 32}
    longrope["short_factor"] = [1.0, 1.2, 1.0, 1.9, 2.5, 1.4, 3.0, 1.1]  # head_dim 16
    longrope["long_factor"] = [1.3, 2.0, 3.5, 6.0, 9.0, 14.0, 22.0, 30.0]
    path = save_family_model(
        tmp_path, "phi3", default_model_path, rope_parameters=longrope,
        original_max_position_embeddings=32, sliding_window=None,
    )  # fmt: skip
    assert load_model(path).config.rope_scaling.attention_factor > 1.1
    check_logits_parity(path, prompt_len=prompt_len, kernels=kernel_family, max_positions=served)


def test_the_gemma_differences_are_read(family_model_paths, native, caplog):
    caplog.set_level("INFO", logger="app.model.loader")
    gemma2 = load_model(family_model_paths["gemma2"])
    config = gemma2.config
    assert (config.hidden_act, config.local_layers, config.local_window) == (
        "gelu_pytorch_tanh",
        (0, 2),
        SLIDING_WINDOW,
    )
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (0.5, 1.0)
    assert config.query_scale == 24**-0.5 and config.local_rope_theta is None
    assert gemma2.attention_backend == "native"  # soft-capped scores: the kernel caps them
    gemma3 = load_model(family_model_paths["gemma3"]).config
    assert gemma3.qk_norm and gemma3.local_layers == (0, 1) and gemma3.local_rope_theta == 100
    assert (gemma3.rope_theta, gemma3.rope_scaling.rope_type) == (1e4, "linear")
    assert gemma3.attn_logit_softcap is None and gemma3.final_logit_softcap is None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoder")]
    assert lines == ["decoder layers: lamina's fused native stack, one call per step"] * 2
