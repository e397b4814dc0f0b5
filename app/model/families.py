"""The model families lamina runs natively: config.json's `architectures[0]` -> Family.

Each family is one file (llama.py, qwen2.py, qwen3.py, mistral.py, phi3.py, gemma.py for
Gemma 2 and 3) whose `FAMILY` names
its model class and reads its differences from LLaMA out of config.json into
ModelConfig's switches. Adding a family: that file, one line here, its parity test
(docs/adding-a-model-family.md). Any other architecture goes to the generic backend
(generic.py), which refuses what it cannot run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from app.model import gemma, llama, mistral, phi3, qwen2, qwen3
from app.model.config import Family, ModelConfig, ModelLoadError, read_config_json
from app.model.generic import generic_config

FAMILIES: dict[str, Family] = {
    family.architecture: family
    for family in (
        llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY, phi3.FAMILY, gemma.GEMMA2,
        gemma.GEMMA3,
    )
}  # fmt: skip
# Folders saved without `architectures` name their family by model_type only.
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def family_of(raw: dict[str, Any]) -> Family:
    """The family of a parsed config.json; ModelLoadError (one line, listing what lamina
    runs) for any other architecture."""
    architectures = raw.get("architectures") or []
    if not architectures and raw.get("model_type") in _BY_MODEL_TYPE:
        architectures = [_BY_MODEL_TYPE[raw["model_type"]]]
    if not architectures or architectures[0] not in FAMILIES:
        found = architectures[0] if architectures else f"model_type {raw.get('model_type')!r}"
        raise ModelLoadError(
            f"unsupported architecture {found!r}: lamina runs {', '.join(FAMILIES)}"
        )
    return FAMILIES[architectures[0]]


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """A parsed config.json -> ModelConfig with its family's differences switched on."""
    family = family_of(raw)
    return ModelConfig.from_dict(raw, architecture=family.architecture, **family.features(raw))


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a local Hugging Face folder: a native family's, else one for the
    generic backend (generic.py); ModelLoadError, in one line saying what lamina runs,
    when neither can run it."""
    raw = read_config_json(model_dir)
    if _native_architecture(raw) in FAMILIES:
        return config_from_dict(raw)
    try:
        return generic_config(model_dir, raw)
    except ModelLoadError as exc:
        found = _native_architecture(raw) or f"model_type {raw.get('model_type')!r}"
        raise ModelLoadError(
            f"unsupported architecture {found!r} ({exc}): lamina runs {', '.join(FAMILIES)} "
            "natively, and other decoder-only causal LMs of transformers whose attention "
            "goes through its AttentionInterface with the generic backend"
        ) from None


def _native_architecture(raw: dict[str, Any]) -> str | None:
    architectures = raw.get("architectures") or []
    if architectures:
        return architectures[0]
    return _BY_MODEL_TYPE.get(raw.get("model_type"))


def build_model(config: ModelConfig) -> nn.Module:
    """The family's model for `config`, unloaded (build it on the meta device); native
    families only (the generic backend's model is transformers', loaded by generic.py)."""
    return FAMILIES[config.architecture].model_class(config)
