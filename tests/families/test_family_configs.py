"""Gemma's config.json as the published checkpoints write it (transformers 4.x: no
`layer_types`, `sliding_window_pattern`, `rope_local_base_freq`, `hidden_act` beside
`hidden_activation`) reads into the same layers, windows and rope bases that
transformers derives from it."""

from __future__ import annotations

import pytest

from app.model.config import ModelLoadError
from app.model.families import config_from_dict

GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 256000,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "vocab_size": 262144,
}


def _local_layers_of_transformers(config_class: str, raw: dict) -> tuple[int, ...]:
    import transformers

    hf = getattr(transformers, config_class)(**raw)
    return tuple(i for i, kind in enumerate(hf.layer_types) if kind == "sliding_attention")


def test_gemma2_as_published():
    config = config_from_dict(GEMMA2_2B)
    assert config.local_layers == _local_layers_of_transformers("Gemma2Config", GEMMA2_2B)
    assert config.local_layers == tuple(range(0, 26, 2)) and config.local_window == 4096
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (50.0, 30.0)
    assert config.hidden_act == "gelu_pytorch_tanh" and config.local_rope_theta is None


def test_gemma3_as_published():
    config = config_from_dict(GEMMA3_1B)
    assert config.local_layers == _local_layers_of_transformers("Gemma3TextConfig", GEMMA3_1B)
    assert 5 not in config.local_layers and len(config.local_layers) == 22
    assert (config.rope_theta, config.local_rope_theta, config.local_window) == (1e6, 1e4, 512)
    assert config.attn_logit_softcap is None and config.qk_norm


def test_gemma3_linear_rope_scaling_is_on_the_global_layers_only():
    raw = {**GEMMA3_1B, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    config = config_from_dict(raw)
    assert (config.rope_scaling.rope_type, config.rope_scaling.factor) == ("linear", 8.0)
    assert config.local_rope_theta == 1e4  # local layers: default rope, their own base


def test_bidirectional_gemma_is_refused():
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        config_from_dict({**GEMMA3_1B, "use_bidirectional_attention": True})
