"""Read a local Hugging Face LLaMA folder: its config.json and its safetensors weights.

Only safetensors are read: pickle checkpoints (*.bin, *.pt) can run code when loaded.
The model is built on the meta device (no memory, no random init) and the checkpoint
tensors are assigned into it, after q/k/v and gate/up are merged into single weights
so every layer runs two matmuls fewer per step.

Checkpoint tensors are views of the file's memory map until something copies them: the
kernels re-lay the linear weights out into memory of their own, and what is left (the
embedding, the norms) is copied once loading ends, so the map, which holds the whole
file resident once it was read, is released with the last view.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class ModelLoadError(ValueError):
    """The folder does not hold a model lamina can serve; the message says why."""


@dataclass(frozen=True)
class RopeScaling:
    """Rotary embedding frequency scaling. `default` means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers our LLaMA implementation needs, read from config.json."""

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
    attention_bias: bool
    mlp_bias: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Validate a parsed config.json; raise ModelLoadError on what we cannot run."""
        _check_architecture(raw)
        hidden_size = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        rope_theta, rope_scaling = _parse_rope(raw)
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
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
        )
        if config.num_heads % config.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({config.num_kv_heads})"
            )
        return config

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found: is {model_dir} a Hugging Face model folder?")
        return cls.from_dict(json.loads(path.read_text()))


def _check_architecture(raw: dict[str, Any]) -> None:
    architectures = raw.get("architectures") or []
    if not architectures and raw.get("model_type") == "llama":
        architectures = ["LlamaForCausalLM"]
    if not any(name in SUPPORTED_ARCHITECTURES for name in architectures):
        raise ModelLoadError(
            f"unsupported architecture {architectures or raw.get('model_type')!r}: "
            f"lamina runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise ModelLoadError(f"unsupported hidden_act {activation!r}: LLaMA uses silu")


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Both layouts: transformers-5 `rope_parameters`, or `rope_theta` + `rope_scaling`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    else:
        params = raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope type {rope_type!r}: "
            f"lamina supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), RopeScaling()
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


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation speeds, [head_dim // 2] fp32, with llama3 scaling when configured.

    llama3 leaves high frequencies (short wavelengths) alone, slows low frequencies by
    `factor`, and blends linearly in between, so long contexts stay in distribution.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling.rope_type == "default":
        return inv_freq
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


# --- weights -----------------------------------------------------------------


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: one file, or the shards an index names."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / name for name in shard_names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} names missing shards: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (
        f" (found {', '.join(pickles)}: pickle checkpoints are never loaded because they can "
        "run code; convert them with transformers' save_pretrained(safe_serialization=True))"
        if pickles
        else ""
    )
    raise ModelLoadError(f"no *.safetensors weights in {model_dir}{hint}")


def _iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, reader.get_tensor(name)


# HF projection name -> (our merged module, position of this part in the merged weight)
_MERGED_PARTS = {
    "self_attn.q_proj": ("attn.qkv_proj", 0),
    "self_attn.k_proj": ("attn.qkv_proj", 1),
    "self_attn.v_proj": ("attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_NUM_PARTS = {"attn.qkv_proj": 3, "mlp.gate_up_proj": 2}
_RENAMED = {
    "self_attn.o_proj": "attn.o_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attention_norm",
}
_TOP_LEVEL = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _split_layer_name(name: str) -> tuple[str, str, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> ('layers.3', 'mlp.up_proj', 'weight')."""
    if not name.startswith("model.layers."):
        return None
    _, _, index, *rest = name.split(".")
    return f"layers.{index}", ".".join(rest[:-1]), rest[-1]


def convert_checkpoint(
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """HF tensor names -> our state dict, on `device` in `dtype`, with merged projections."""
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved it; we recompute it from the config
        tensor = tensor.to(device=device, dtype=dtype)
        if name in _TOP_LEVEL:
            state[_TOP_LEVEL[name]] = tensor
            continue
        parts = _split_layer_name(name)
        if parts is None:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint")
        layer, module, kind = parts
        if module in _RENAMED:
            state[f"{layer}.{_RENAMED[module]}.{kind}"] = tensor
        elif module in _MERGED_PARTS:
            merged, position = _MERGED_PARTS[module]
            key = f"{layer}.{merged}.{kind}"
            slots = pending.setdefault(key, [None] * _NUM_PARTS[merged])
            slots[position] = tensor
            if all(part is not None for part in slots):
                state[key] = torch.cat(slots, dim=0)
                del pending[key]
        else:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint")
    if pending:
        raise ModelLoadError(f"checkpoint lacks parts of: {', '.join(sorted(pending))}")
    if config.tie_word_embeddings:
        # The head reuses the embedding matrix; a saved copy (some checkpoints keep one)
        # is ignored, exactly as transformers does for tied models.
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_positions: int | None = None,
    *,
    weight_dtype: torch.dtype | None = None,
    batch_invariant: bool = True,
    kernels: str = "auto",
) -> torch.nn.Module:
    """Build our LlamaForCausalLM from a local folder, ready for inference on `device`.

    `max_positions` sizes the rotary cos/sin table (default: max_position_embeddings).
    `weight_dtype` (CPU only) stores linear weights in another precision; `kernels`
    "auto" picks the fastest matmul kernels for the device, "reference" keeps
    F.linear on the weights as loaded (for tests that inspect them).
    """
    from app.model.linear import kernel_plan
    from app.model.llama import LlamaForCausalLM  # llama imports this module for the config

    device = torch.device(device)
    config = ModelConfig.from_dir(model_dir)
    files = safetensors_files(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = convert_checkpoint(_iter_checkpoint(files), config, device, dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint does not match config.json: {exc}") from None
    # A tied head is the embedding again: count each tensor once.
    num_parameters = sum({t.data_ptr(): t.numel() for t in state.values()}.values())
    del state  # the modules hold what they need; nothing else may keep checkpoint views
    plan = kernel_plan(device, dtype, weight_dtype, batch_invariant, kernels)
    model.finish_loading(device, max_positions or config.max_position_embeddings, plan)
    if device.type == "cpu":
        _copy_out_of_checkpoint(model)
    logger.info(
        "loaded %s: %d layers, %.1fM parameters, %s on %s, linear weights %s%s",
        Path(model_dir).name,
        config.num_layers,
        num_parameters / 1e6,
        dtype,
        device,
        plan.weight_dtype if plan else dtype,
        _kernel_note(plan),
    )
    return model.eval()


def _copy_out_of_checkpoint(model: torch.nn.Module) -> None:
    """Give every parameter still held memory of its own (a tied weight stays one).

    On the CPU an unconverted parameter is a view of the checkpoint's memory map, which
    keeps the whole file mapped and resident; the copies let the map go.
    """
    copies: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in copies:
                copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
            setattr(module, name, copies[id(param)])


def _kernel_note(plan) -> str:
    if plan is None:
        return ""
    if plan.uses_native_matmul:
        return " (lamina native kernels)"
    notes = " (oneDNN packed)" if plan.use_onednn else ""
    if plan.native is not None:
        notes += " (native attention)"
    return notes
