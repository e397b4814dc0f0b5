"""What lamina knows of a model's architecture: config.json read and validated into
`ModelConfig`, its rotary frequencies, its EOS ids. A leaf: the model definition, the
KV cache and the loader all name it, and it names none of them.

`ModelConfig` holds the fields every family shares plus each family difference as a
plain switch (q/k/v and o biases, per-head q/k norms, a sliding window). Which switches
a family turns on, and from which config.json fields, is the family's `Family.features`
(app/model/families.py and the one file per family it lists)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# Why the others are refused: each changes the numbers in a way lamina does not compute.
_REFUSED_ROPE_TYPES = {
    "dynamic": "its frequencies change with the longest sequence of each batch, so a "
    "token's result would depend on its neighbours",
}


class ModelLoadError(ValueError):
    """The folder does not hold a model lamina can serve; the message says why."""


@dataclass(frozen=True)
class Family:
    """One architecture lamina runs natively: `config.json`'s `architectures[0]`, the
    model class that runs it, and `features(raw config) -> ModelConfig fields`: the
    family's differences from LLaMA, read from its config.json (or fixed by the family)."""

    architecture: str
    model_class: Callable[[ModelConfig], Any]
    features: Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class RopeScaling:
    """Rotary embedding frequency scaling. `default` means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn: the frequency band blended between interpolation and extrapolation, and the
    # factor cos and sin are multiplied by (its attention temperature).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    # longrope: a divisor per frequency, for contexts up to the original length (short)
    # and beyond it (long); [head_dim / 2] each.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers lamina's decoder needs, read from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on the q, k and v projections
    o_bias: bool  # a bias on the attention's output projection
    mlp_bias: bool
    architecture: str = "LlamaForCausalLM"
    qk_norm: bool = False  # RMSNorm over each q and k head before the rotary embedding
    sliding_window: int | None = None  # a token sees only its last `sliding_window` keys
    hidden_act: str = "silu"  # the MLP's gate activation (SUPPORTED_ACTIVATIONS)
    # Gemma's local layers: these layers see their last `local_window` keys only (the
    # others every key, or `sliding_window`), and rotate with `local_rope_theta` when set.
    # local_window is None when no layer is local.
    local_layers: tuple[int, ...] = ()
    local_window: int | None = None
    local_rope_theta: float | None = None  # default rope with this base on local layers
    query_scale: float | None = None  # the attention's score scale; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    generic: bool = False  # run by transformers' own modules (app/model/generic.py)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **features: Any) -> ModelConfig:
        """Validate a parsed config.json's shared fields; `features` are the family's
        (Family.features). Raises ModelLoadError on what lamina cannot run."""
        hidden_size = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        rope_theta, rope_scaling = parse_rope(raw)
        config = cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get("attention_bias", False)),
            o_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            hidden_act=str(raw.get("hidden_act", "silu")),
        )
        config = replace(config, **features)
        _check_activation(config.hidden_act)
        if config.local_layers and (config.local_window or 0) < 1:
            raise ModelLoadError(f"sliding_window must be at least 1, not {config.local_window}")
        if config.sliding_window is not None and config.sliding_window < 1:
            raise ModelLoadError(f"sliding_window must be at least 1, not {config.sliding_window}")
        if config.num_heads % config.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({config.num_kv_heads})"
            )
        return config


def read_config_json(model_dir: str | Path, setting: str = "LAMINA_MODEL") -> dict[str, Any]:
    """config.json of a model folder, parsed (`setting`: the variable naming the folder,
    for the message when there is none)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        ggufs = sorted(p.name for p in Path(model_dir).glob("*.gguf"))
        hint = (
            f"; the folder holds {', '.join(ggufs)}: set {setting} to that file"
            if ggufs
            else f"; {setting} may also name a .gguf file or a hub id (org/name)"
        )
        raise ModelLoadError(
            f"{path} not found: a Hugging Face model folder has config.json, *.safetensors "
            f"and tokenizer files{hint}"
        )
    return json.loads(path.read_text())


SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def _check_activation(activation: str) -> None:
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(
            f"unsupported hidden_act {activation!r}: lamina's gated MLP runs "
            f"{', '.join(SUPPORTED_ACTIVATIONS)}"
        )


def parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Rope base and scaling of a config.json; both layouts: transformers-5
    `rope_parameters`, or `rope_theta` + `rope_scaling`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    else:
        params = raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)  # early Phi-3 configs' name
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelLoadError(
            f"unsupported partial_rotary_factor {partial}: lamina rotates whole heads"
        )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = _REFUSED_ROPE_TYPES.get(rope_type)
        raise ModelLoadError(
            f"unsupported rope type {rope_type!r}{f' ({why})' if why else ''}: "
            f"lamina supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), RopeScaling()
    if rope_type == "linear":
        if "factor" not in params:
            raise ModelLoadError("rope type 'linear' needs a factor in its parameters")
        return float(theta), RopeScaling(rope_type="linear", factor=float(params["factor"]))
    if rope_type == "yarn":
        return float(theta), _parse_yarn(raw, params)
    if rope_type == "longrope":
        return float(theta), _parse_longrope(raw, params)
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ModelLoadError(f"rope type 'llama3' needs {', '.join(missing)} in its parameters")
    original = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    scaling = RopeScaling(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )
    return float(theta), scaling


def _parse_yarn(raw: dict[str, Any], params: dict[str, Any]) -> RopeScaling:
    """YaRN's parameters, with transformers' defaults (modeling_rope_utils.py)."""
    original = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    factor = params.get("factor") or int(raw["max_position_embeddings"]) / int(original)

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        weights = params.get("mscale"), params.get("mscale_all_dim")
        if all(weights):
            attention_factor = mscale(factor, weights[0]) / mscale(factor, weights[1])
        else:
            attention_factor = mscale(factor)
    return RopeScaling(
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
    )


def _parse_longrope(raw: dict[str, Any], params: dict[str, Any]) -> RopeScaling:
    """LongRoPE's (Phi-3 128k, Phi-3.5, Phi-4-mini) factors and temperature, with
    transformers' defaults: the temperature comes from how far max_position_embeddings
    reaches past the original context."""
    # transformers gives the config's own value the precedence (Phi-3 keeps it there).
    original = raw.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings"
    )
    missing = [k for k in ("short_factor", "long_factor") if not params.get(k)]
    if original is None:
        missing.append("original_max_position_embeddings")
    if missing:
        raise ModelLoadError(f"rope type 'longrope' needs {', '.join(missing)}")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    for key in ("short_factor", "long_factor"):
        if len(params[key]) != head_dim // 2:
            raise ModelLoadError(
                f"rope type 'longrope': {key} has {len(params[key])} values, the heads need "
                f"{head_dim // 2} (head_dim / 2)"
            )
    factor = params.get("factor") or int(raw["max_position_embeddings"]) / int(original)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(int(original)))
        )
    return RopeScaling(
        rope_type="longrope",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        attention_factor=float(attention_factor),
        short_factor=tuple(float(v) for v in params["short_factor"]),
        long_factor=tuple(float(v) for v in params["long_factor"]),
    )


def _longrope_inverse_frequencies(
    config: ModelConfig, exponents: torch.Tensor, max_positions: int | None
) -> torch.Tensor:
    """LongRoPE: each frequency slowed by its own factor, the long ones when the served
    context reaches past the original one, the short ones otherwise.

    transformers picks per forward pass by the batch's longest sequence, which would
    make a token's result depend on its neighbours (and rotate a sequence's keys with
    two sets of factors as it grows); lamina picks once, by the context it serves
    (LAMINA_MAX_MODEL_LEN, else max_position_embeddings), as llama.cpp does by its
    context size. Sequences within the original context served with a context no
    longer than it match transformers exactly, and so do sequences past it.
    """
    scaling = config.rope_scaling
    served = max_positions or config.max_position_embeddings
    long = served > (scaling.original_max_position_embeddings or 0)
    factors = torch.tensor(scaling.long_factor if long else scaling.short_factor)
    return 1.0 / (factors * config.rope_theta**exponents)  # transformers' order: same bits


def _yarn_inverse_frequencies(config: ModelConfig, exponents: torch.Tensor) -> torch.Tensor:
    """YaRN: dimensions that turn fewer than beta_slow times over the original context are
    interpolated (slowed by `factor`), those that turn more than beta_fast times are left
    alone, and a linear ramp blends the ones between."""
    scaling, dim, base = config.rope_scaling, config.head_dim, config.rope_theta
    original = scaling.original_max_position_embeddings

    def dimension_for(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_for(scaling.beta_fast), dimension_for(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp  # [head_dim / 2]: the share that keeps its own frequency
    wavelengths = base**exponents  # in transformers' order of operations: the same bits
    interpolated = 1.0 / (scaling.factor * wavelengths)
    return interpolated * (1 - extrapolated) + 1.0 / wavelengths * extrapolated


def rope_inverse_frequencies(config: ModelConfig, max_positions: int | None = None) -> torch.Tensor:
    """Per-pair rotation speeds, [head_dim // 2] fp32, with the configured scaling, for a
    model served with a context of `max_positions` (longrope's choice; default
    max_position_embeddings).

    linear slows every frequency by `factor` (positions interpolated). llama3 leaves high
    frequencies (short wavelengths) alone, slows low frequencies by `factor`, and blends
    linearly in between, so long contexts stay in distribution.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_inverse_frequencies(config, exponents)
    if scaling.rope_type == "longrope":
        return _longrope_inverse_frequencies(config, exponents, max_positions)
    original_len = scaling.original_max_position_embeddings
    low_freq_wavelen = original_len / scaling.low_freq_factor
    high_freq_wavelen = original_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    blend = (original_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - blend) * slowed / scaling.factor + blend * slowed
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, slowed)


def read_eos_token_ids(model_dir: str | Path) -> frozenset[int]:
    """EOS ids from config.json and generation_config.json (either may hold an int or a list)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        eos = json.loads(path.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
    return frozenset(ids)
