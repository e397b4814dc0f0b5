"""Read a GGUF file (llama.cpp's format) as a Hugging Face checkpoint: its metadata as a
config.json dict, its tensors dequantized and renamed to transformers' names.

Everything is checked before a tensor is read (architecture, quant types, tensor
names, rope scaling), so a file lamina cannot use is refused with one line naming the
file and the field, never half-loaded. The tensor-name table and the q/k permutation
follow transformers' GGUF loader (modeling_gguf_pytorch_utils.py), itself the inverse
of llama.cpp's convert_hf_to_gguf.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.model.config import ModelLoadError

# GGUF `general.architecture` -> the transformers class lamina runs it with. llama.cpp
# stores Mistral (without a sliding window) as `llama`.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# llama.cpp interleaves the rotary halves of q and k for these (convert_hf_to_gguf.py's
# LlamaModel.permute); they are put back in transformers' order here.
_PERMUTED_QK = {"llama"}

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: Path):
    """A GGUFReader over `path` (memory-mapped); ModelLoadError if it cannot be parsed."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - a dependency of lamina
        raise ModelLoadError("serving a .gguf file needs the `gguf` package") from None
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        if isinstance(exc, ValueError) and "cannot reshape" in str(exc):
            # The reader views each tensor's bytes in the memory map: a tensor running
            # past the end of the file is a short slice that will not take its shape
            raise ModelLoadError(
                f"{path}: the file ends before its tensors' data does: a copy or download "
                f"cut short? ({path.stat().st_size} bytes; {exc})"
            ) from None
        # An unknown tensor type id fails here (GGMLQuantizationType(n)).
        raise ModelLoadError(
            f"{path}: not a GGUF file this `gguf` package can read ({exc}); lamina reads "
            f"the quant types {', '.join(dequantizable_types())}"
        ) from None


def dequantizable_types() -> list[str]:
    """The tensor types the installed `gguf` package turns back into floats."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the types with a dequantize implementation

    names = {"F32", "F16"} | {qtype.name for qtype in _type_traits}
    return [t.name for t in GGMLQuantizationType if t.name in names]


def _value(reader, key: str, path: Path, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ModelLoadError(f"{path}: metadata field {key!r} is missing")
        return default
    return field.contents()


def gguf_architecture(reader, path: Path) -> str:
    """`general.architecture`, refused unless lamina runs it."""
    arch = _value(reader, "general.architecture", path)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: general.architecture {arch!r} is not one lamina runs from GGUF "
            f"(it runs {', '.join(GGUF_ARCHITECTURES)}); convert the model to a Hugging Face "
            "folder (safetensors) to serve another family"
        )
    return arch


def gguf_config(reader, path: Path) -> dict[str, Any]:
    """The config.json transformers would write for this file, after every check."""
    arch = gguf_architecture(reader, path)
    check_tensors(reader, path)

    def meta(key: str, default: Any = ...) -> Any:
        return _value(reader, f"{arch}.{key}", path, default)

    num_heads = int(meta("attention.head_count"))
    num_kv_heads = meta("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        raise ModelLoadError(f"{path}: {arch}.attention.head_count_kv differs per layer")
    hidden_size = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden_size // num_heads))
    names = {t.name: t for t in reader.tensors}
    embedding = names["token_embd.weight"]
    return {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(embedding.shape[1]),  # ggml order: [hidden, vocab]
        "hidden_size": hidden_size,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(meta("context_length")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch, path, head_dim),
        # No output tensor: the head is the embedding (llama.cpp drops the copy).
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id", path, None),
        "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id", path, None),
    }


def _rope_scaling(reader, arch: str, path: Path, head_dim: int) -> dict[str, Any] | None:
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        theta = float(_value(reader, f"{arch}.rope.freq_base", path, 10000.0))
        return _llama3_rope_scaling(np.asarray(freqs.data, dtype=np.float64), theta, head_dim, path)
    kind = _value(reader, f"{arch}.rope.scaling.type", path, "none")
    if kind == "none":
        return None
    factor = float(_value(reader, f"{arch}.rope.scaling.factor", path))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _value(reader, f"{arch}.rope.scaling.original_context_length", path)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ModelLoadError(
        f"{path}: {arch}.rope.scaling.type {kind!r} is not supported (lamina reads none, "
        "linear and yarn from GGUF)"
    )


# Llama 3.x's rope scaling, as every release sets it; llama.cpp stores only its result,
# a divisor per rotary frequency (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors).
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_rope_divisors(
    theta: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """What llama.cpp writes as `rope_freqs.weight` for these llama3 parameters ([head_dim/2])."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen > low_wavelen, factor, divisors)
    return np.where(wavelen < high_wavelen, 1.0, divisors)


def _llama3_rope_scaling(
    divisors: np.ndarray, theta: float, head_dim: int, path: Path
) -> dict[str, Any] | None:
    """The llama3 rope parameters that give `divisors`, checked by computing them again."""
    if np.all(divisors == 1.0):
        return None
    params = {"factor": float(divisors.max()), **_LLAMA3_ROPE}
    expected = llama3_rope_divisors(theta, head_dim, **params)
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-5):
        raise ModelLoadError(
            f"{path}: tensor 'rope_freqs.weight' is not Llama 3's rope scaling (factor "
            f"{params['factor']:g}, low/high frequency factors 1 and 4, original context "
            "8192), the only one lamina reads from it; serve the Hugging Face folder instead"
        )
    return {"rope_type": "llama3", **params}


def hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.ffn_up.weight' -> 'model.layers.3.mlp.up_proj.weight'; None if unknown."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    match = _LAYER_TENSOR.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_PARTS:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_PARTS[part]}.{kind}"


def check_tensors(reader, path: Path) -> None:
    """Every tensor has a name lamina maps and a type it can dequantize."""
    readable = set(dequantizable_types())
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # read into config.json's rope_scaling by _rope_scaling
        if tensor.tensor_type.name not in readable:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} has quant type {tensor.tensor_type.name}, "
                f"which lamina cannot dequantize; it reads {', '.join(sorted(readable))}"
            )
        if hf_tensor_name(tensor.name) is None:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} is not one lamina knows")
    if "token_embd.weight" not in {t.name for t in reader.tensors}:
        raise ModelLoadError(f"{path}: tensor 'token_embd.weight' is missing")


def _unpermute(weight: Any, num_heads: int) -> Any:
    """Undo llama.cpp's q/k permutation: per head, [dim/2 pairs, 2] -> [2, dim/2]. An
    ndarray or a tensor (both reshape and swap axes alike)."""
    # [num_heads * head_dim, in] -> [num_heads, head_dim/2, 2, in] -> swap -> back
    half = weight.shape[0] // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.swapaxes(2, 1).reshape(weight.shape)


def tensor_table(reader) -> list[dict[str, Any]]:
    """Where each tensor lies in the file: name, type, ggml shape, byte offset and size.
    Written beside the file's folder, it spares a load the slow parse of the metadata
    (the vocabulary is ~100k small strings)."""
    return [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(n) for n in t.shape.tolist()],
            "offset": int(t.data_offset),
            "num_bytes": int(t.n_bytes),
        }
        for t in reader.tensors
    ]


# Half-precision tensors are yielded as stored, not dequantized to fp32: the loader
# converts each to the model dtype (exactly, as dequantizing did), except the input
# embedding, which keeps the file's fp16/bf16 where that holds it exactly
# (embedding.stored_dtype): half the memory, and no fp32 copy of each tensor on the way.
_HALF_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def iter_gguf_tensors(
    path: Path,
    config: dict[str, Any],
    table: list[dict[str, Any]],
    from_file: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) for every tensor of `table` (tensor_table of
    the file, already checked), one at a time, so only one dequantized tensor is held
    beyond what the caller keeps. Those named in `from_file` (read from the file's own
    blocks when packed: 4-bit projections, a Q8_0 embedding) are not dequantized: an
    empty tensor of their shape on the meta device stands for each. A tensor is float32,
    or float16/bfloat16 where the file stores it so."""
    from gguf import GGMLQuantizationType

    permuted = config["model_type"] in _PERMUTED_QK
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    with open(path, "rb") as file:
        for entry in table:
            if entry["name"] == "rope_freqs.weight":
                continue  # in config.json's rope_scaling; lamina computes the frequencies
            name = str(hf_tensor_name(entry["name"]))
            shape = tuple(reversed(entry["shape"]))  # ggml lists the fastest dimension first
            if name in from_file:
                yield name, torch.empty(shape, dtype=torch.float32, device="meta")
                continue
            part = entry["name"].split(".")[2] if entry["name"].startswith("blk.") else ""
            if entry["type"] in _HALF_TYPES:  # kept as stored (see _HALF_TYPES)
                half = torch.from_numpy(_read(file, entry)).view(_HALF_TYPES[entry["type"]])
                half = half.reshape(shape)
                if permuted and part in heads:
                    half = _unpermute(half, heads[part]).contiguous()
                yield name, half
                continue
            values = dequantize(_read(file, entry), GGMLQuantizationType[entry["type"]], shape)
            if permuted and part in heads:
                values = np.ascontiguousarray(_unpermute(values, heads[part]))
            yield name, torch.from_numpy(values)


def _read(file, entry: dict[str, Any]) -> np.ndarray:
    """A tensor's bytes, read into memory of their own: a memory map of the file would
    keep every page read resident until the load ends, and gguf's dequantize, which
    works in groups of rows, pays for every slice of an np.memmap (a third of its time)."""
    raw = np.empty(entry["num_bytes"], dtype=np.uint8)
    file.seek(entry["offset"])
    if file.readinto(raw) != raw.size:
        raise ModelLoadError(f"{file.name}: tensor {entry['name']!r} was cut short")
    return raw


def dequantize(raw: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's bytes of GGML type `qtype` -> its float32 values [shape] (the `gguf`
    package's dequantize; F32 is a view of `raw`)."""
    from gguf import quants

    values = quants.dequantize(raw.reshape(quants.quant_shape_to_byte_shape(shape, qtype)), qtype)
    return values.reshape(shape)
