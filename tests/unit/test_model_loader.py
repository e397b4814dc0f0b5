"""Loader: config parsing (both rope layouts), clear errors, safetensors only, merged weights."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from app.model.config import ModelLoadError, read_eos_token_ids, rope_inverse_frequencies
from app.model.families import config_from_dict, read_model_config
from app.model.loader import load_model, safetensors_files
from tests.model.helpers import save_random_llama

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}
LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_defaults_from_a_minimal_config():
    config = config_from_dict(BASE)
    assert config.num_kv_heads == 4  # no num_key_value_heads: plain multi-head attention
    assert config.head_dim == 16
    assert config.rope_theta == 10000.0
    assert config.rope_scaling.rope_type == "default"
    assert not config.tie_word_embeddings


@pytest.mark.parametrize(
    "rope_fields",
    [
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}},
        {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},
        {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **LLAMA3}},
    ],
    ids=["rope_parameters", "rope_scaling.rope_type", "rope_scaling.type"],
)
def test_both_rope_layouts_read_the_same(rope_fields):
    config = config_from_dict({**BASE, **rope_fields})
    assert config.rope_theta == 5e5
    assert config.rope_scaling.rope_type == "llama3"
    assert config.rope_scaling.factor == 8.0
    assert config.rope_scaling.original_max_position_embeddings == 64


@pytest.mark.parametrize("rope_type", ["dynamic", "xpos"])
def test_unsupported_rope_type_is_a_clear_error(rope_type):
    raw = {**BASE, "rope_scaling": {"rope_type": rope_type, "factor": 2.0}}
    with pytest.raises(ModelLoadError, match=f"unsupported rope type '{rope_type}'.*llama3"):
        config_from_dict(raw)


def test_llama3_without_its_factors_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="low_freq_factor"):
        config_from_dict({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


@pytest.mark.parametrize(
    "change",
    [{"architectures": ["MixtralForCausalLM"]}, {"hidden_act": "gelu"}],
    ids=["architecture", "activation"],
)
def test_unsupported_models_are_clear_errors(change):
    with pytest.raises(ModelLoadError, match="unsupported"):
        config_from_dict({**BASE, **change})


def test_unsupported_architecture_lists_the_supported_ones():
    raw = {**BASE, "architectures": ["MixtralForCausalLM"]}
    with pytest.raises(ModelLoadError) as error:
        config_from_dict(raw)
    message = str(error.value)
    assert "\n" not in message and "'MixtralForCausalLM'" in message
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert name in message


def test_linear_rope_frequencies_match_transformers():
    hf_config = LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "architectures"},
        rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    )
    expected, _ = ROPE_INIT_FUNCTIONS["linear"](hf_config, "cpu")
    ours = config_from_dict({**json.loads(hf_config.to_json_string()), **BASE})
    assert ours.rope_scaling.rope_type == "linear"
    torch.testing.assert_close(rope_inverse_frequencies(ours), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "params",
    [
        {"factor": 4.0, "original_max_position_embeddings": 32},
        {"factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "truncate": False},
        {"factor": 2.0, "original_max_position_embeddings": 64, "mscale": 1, "mscale_all_dim": 0.5},
    ],
    ids=["qwen", "betas_untruncated", "mscales"],
)
def test_yarn_frequencies_and_temperature_match_transformers(params):
    hf_config = LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "architectures"},
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, **params},
    )
    expected, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    ours = config_from_dict({**json.loads(hf_config.to_json_string()), **BASE})
    torch.testing.assert_close(rope_inverse_frequencies(ours), expected, rtol=0, atol=0)
    assert ours.rope_scaling.attention_factor == attention_factor


def test_llama3_frequencies_match_transformers():
    hf_config = LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "architectures"},
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3},
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = config_from_dict(json.loads(hf_config.to_json_string()))
    torch.testing.assert_close(rope_inverse_frequencies(ours), expected, rtol=0, atol=0)


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    save_random_llama(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors.*pytorch_model.bin.*pickle"):
        load_model(tmp_path)


def test_missing_shard_is_a_clear_error(tmp_path):
    save_random_llama(tmp_path, max_shard_size="100KB")
    shards = safetensors_files(tmp_path)
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match="missing shards"):
        load_model(tmp_path)


def test_merged_projections_and_untied_head(tmp_path):
    save_random_llama(tmp_path)
    hf = load_file(tmp_path / "model.safetensors")
    model = load_model(tmp_path, kernels="reference")  # keeps the weights as loaded
    layer = model.layers[1]
    prefix = "model.layers.1."
    expected_qkv = torch.cat([hf[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    expected_gate_up = torch.cat([hf[prefix + f"mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(layer.attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(layer.mlp.gate_up_proj.weight, expected_gate_up)
    assert torch.equal(model.lm_head.weight, hf["lm_head.weight"])
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())


def test_tied_head_shares_the_embedding(tmp_path):
    save_random_llama(tmp_path, tie_word_embeddings=True)
    model = load_model(tmp_path, kernels="reference")
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc")
@pytest.mark.parametrize("family", ["auto", "torch", "reference"])
def test_the_checkpoint_file_is_unmapped_once_loaded(tmp_path, family):
    """Every tensor the model keeps has memory of its own: a view left on the file's map
    would keep the whole checkpoint mapped, resident beside the packed copies."""
    save_random_llama(tmp_path, tie_word_embeddings=True)
    checkpoint = str(tmp_path / "model.safetensors")
    model = load_model(tmp_path, kernels=family)
    gc.collect()
    assert checkpoint not in Path("/proc/self/maps").read_text()
    if family == "reference":  # the copy of a tied weight is still one tensor
        assert model.lm_head.weight is model.embed_tokens.weight


def test_dtype_is_applied(tmp_path):
    save_random_llama(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.cos.dtype == torch.bfloat16


def test_eos_ids_from_config_and_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert read_eos_token_ids(tmp_path) == {2, 7}


def test_default_model_config(default_model_path):
    config = read_model_config(default_model_path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert config.rope_theta == 100000.0
    assert config.tie_word_embeddings


# head_dim 16: 8 factors each, uneven so that every frequency is moved differently.
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 1e4,
    "short_factor": [1.0, 1.1, 1.3, 1.0, 2.0, 1.7, 3.0, 1.05],
    "long_factor": [1.5, 2.0, 4.0, 6.5, 9.0, 13.0, 20.0, 31.0],
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize("served", [32, 128])
def test_longrope_frequencies_and_temperature_match_transformers(served):
    """Short factors for a served context within the original one, long ones past it;
    the temperature from max_position_embeddings / original (Phi-3's rule)."""
    fields = {k: v for k, v in BASE.items() if k != "architectures"}
    hf_config = LlamaConfig(**fields, rope_parameters=LONGROPE)
    hf_config.original_max_position_embeddings = 32
    seq_len = None if served <= 32 else served
    expected, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu", seq_len=seq_len)
    ours = config_from_dict({**json.loads(hf_config.to_json_string()), **BASE})
    assert ours.rope_scaling.rope_type == "longrope"
    torch.testing.assert_close(rope_inverse_frequencies(ours, served), expected, rtol=0, atol=0)
    assert ours.rope_scaling.attention_factor == attention_factor > 1


def test_longrope_without_its_factors_is_refused():
    broken = {**LONGROPE, "long_factor": [1.0, 2.0]}
    with pytest.raises(ModelLoadError, match="long_factor has 2 values, the heads need 8"):
        config_from_dict({**BASE, "rope_parameters": broken})
    with pytest.raises(ModelLoadError, match="needs short_factor"):
        config_from_dict({**BASE, "rope_parameters": {**LONGROPE, "short_factor": None}})
    su = {**LONGROPE, "rope_type": None, "type": "su"}  # early Phi-3 configs' name
    assert config_from_dict({**BASE, "rope_scaling": su}).rope_scaling.rope_type == "longrope"
