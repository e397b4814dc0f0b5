"""A GGUF file's 4-bit projections as lamina's int4 blocks, read from the file's own
bytes, so that LAMINA_WEIGHT_DTYPE=int4 multiplies by exactly the file's weights.

lamina's int4 block is Q4_1's scheme with fp32 numbers (int4.h): per column and 32
consecutive k, w = q * scale + minimum, q in [0, 15]. Three GGML types are that scheme
with fp16 numbers, which fp32 holds exactly:

- Q4_0 (32 weights, fp16 d): w = (q - 8) * d, so scale = d, minimum = -8 * d;
- Q4_1 (32 weights, fp16 d and m): w = q * d + m, so scale = d, minimum = m;
- Q4_K (256 weights, fp16 d and dmin, eight sub-blocks of 32 with 6-bit sc_j and m_j):
  w = q * (d * sc_j) - dmin * m_j, so scale = d * sc_j and minimum = -dmin * m_j, both
  exact in fp32 (11-bit by 6-bit significands).

Each weight is then one rounding of the exact q * scale + minimum, as in the `gguf`
package's dequantize (the reference: gguf.quants), so the kernels' weights are the file's
bit for bit (tests/model/test_gguf_int4.py). Other types are not on such a grid: an int4
plan requantizes them, or keeps them in int8 blocks where the file holds them wider than
4 bits (int4_storage).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.model.checkpoint_names import module_parts
from app.model.config import read_config_json
from app.model.gguf import _PERMUTED_QK, _unpermute, hf_tensor_name
from app.native.panels import Int4Blocks

EXACT_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
# Types whose weights carry more than 4 bits. A file that stores some projections in 4
# bits and these in more (llama.cpp's mixes: Q4_K_M keeps attn_v and half of ffn_down in
# Q6_K) chose them to be wider, so an int4 plan keeps them in int8 blocks.
WIDER_THAN_4_BITS = frozenset(
    {"F32", "F16", "BF16", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"}
)
logger = logging.getLogger(__name__)

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_FP16_BYTES = 2


def projection_types(table: list[dict[str, Any]]) -> dict[str, str]:
    """transformers' name of each projection weight in the file's tensor table -> its
    GGML type ('model.layers.0.self_attn.q_proj.weight' -> 'Q4_K')."""
    return {
        str(hf_tensor_name(t["name"])): t["type"]
        for t in table
        if t["name"].startswith("blk.") and t["name"].split(".")[2] in PROJECTIONS
        and t["name"].endswith(".weight")
    }  # fmt: skip


def int4_storage(part_types: list[str], file_has_4_bits: bool) -> str:
    """How an int4 plan stores a projection made of parts of these GGML types (q, k and
    v are one projection): "file" (every part's own 4-bit blocks), "int8" (a part the
    file keeps wider than the 4 bits of its other projections), or "int4" (requantized:
    types on no such grid, or a file without 4-bit projections, where int4 was asked
    for every projection)."""
    if all(t in EXACT_INT4_TYPES for t in part_types):
        return "file"
    if file_has_4_bits and any(t in WIDER_THAN_4_BITS for t in part_types):
        return "int8"
    return "int4"


def has_4_bit_projections(types: dict[str, str]) -> bool:
    """Whether the file stores some projections in 4 bits or fewer."""
    return any(t not in WIDER_THAN_4_BITS for t in types.values())


def int4_reader(
    path: Path, config: dict[str, Any], table: list[dict[str, Any]]
) -> Callable[[str], Int4Blocks]:
    """A function from a projection's transformers name to its blocks in the file (type
    in EXACT_INT4_TYPES), rows in transformers' order (llama.cpp's q/k permutation undone,
    as for the dequantized weights). It reads the file's memory map when called, so only
    the blocks being packed are held."""
    entries = {hf_tensor_name(t["name"]): t for t in table}
    permuted = config["model_type"] in _PERMUTED_QK
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    def read(name: str) -> Int4Blocks:
        entry = entries[name]
        data = np.memmap(path, dtype=np.uint8, mode="r")
        raw = np.asarray(data[entry["offset"] : entry["offset"] + entry["num_bytes"]])
        in_features, out_features = entry["shape"]  # ggml lists the fastest dimension first
        arrays = _decode(raw.reshape(out_features, -1), entry["type"], in_features)
        part = entry["name"].split(".")[2]
        if permuted and part in heads:  # in numpy: torch's uint8 copies are slower
            arrays = tuple(_unpermute(array, heads[part]) for array in arrays)
        return _as_blocks(arrays)

    return read


def use_files_int4_blocks(
    model: nn.Module, model_dir: Path, table: list[dict[str, Any]]
) -> frozenset[str]:
    """Before an int4 plan packs a GGUF folder's model (`table`: its gguf_tensors.json):
    give each projection the file's own 4-bit blocks where its parts are Q4_0, Q4_1 or
    Q4_K (no requantization), and keep in int8 blocks those the file stores wider than
    its 4-bit ones (int4_storage). Returns the transformers names of the weights read
    from the file's blocks, which the loader need not dequantize."""
    types = projection_types(table)
    read = int4_reader(next(model_dir.glob("*.gguf")), read_config_json(model_dir), table)
    file_has_4_bits = has_4_bit_projections(types)
    counts: dict[str, int] = {}
    from_file: set[str] = set()
    for module_name, names in module_parts(list(types)).items():
        linear = model.get_submodule(module_name)
        storage = int4_storage([types[name] for name in names], file_has_4_bits)
        counts[storage] = counts.get(storage, 0) + 1
        if storage == "file":
            linear.file_int4 = partial(_read_int4_blocks, read, names)
            from_file.update(names)
        linear.keeps_int8 = storage == "int8"
    logger.info(
        "int4 weights from the GGUF file: %d projections in its own 4-bit blocks, %d kept in "
        "int8 blocks (stored wider than 4 bits), %d requantized",
        counts.get("file", 0), counts.get("int8", 0), counts.get("int4", 0),
    )  # fmt: skip
    return frozenset(from_file)


def _read_int4_blocks(read, names: list[str]) -> Int4Blocks:
    return Int4Blocks.cat([read(name) for name in names])


def decode_int4(raw: np.ndarray, qtype: str, in_features: int) -> Int4Blocks:
    """A tensor's bytes [N, bytes per row] of type Q4_0, Q4_1 or Q4_K -> its blocks,
    q [N, K] and scales, minima [N, K / 32] (see the module docstring)."""
    return _as_blocks(_decode(raw, qtype, in_features))


def _decode(raw: np.ndarray, qtype: str, in_features: int) -> tuple[np.ndarray, ...]:
    """decode_int4's q [N, K] uint8, scales and minima [N, K / 32] fp32, in numpy."""
    decoders = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}
    if qtype not in decoders:
        raise ValueError(f"{qtype} weights are not on lamina's 4-bit grid")
    q, scales, minima = decoders[qtype](raw)
    num_rows = raw.shape[0]
    return (
        q.reshape(num_rows, in_features),
        scales.reshape(num_rows, -1).astype(np.float32, copy=False),
        minima.reshape(num_rows, -1).astype(np.float32, copy=False),
    )


def _as_blocks(arrays: tuple[np.ndarray, ...]) -> Int4Blocks:
    return Int4Blocks(*(torch.from_numpy(np.ascontiguousarray(array)) for array in arrays))


def _fp16(raw: np.ndarray, start: int) -> np.ndarray:
    """The fp16 numbers at byte `start` of every block ([..., bytes]) as fp32 [...]."""
    return raw[..., start : start + _FP16_BYTES].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles_by_halves(packed: np.ndarray) -> np.ndarray:
    """Bytes [..., 16]: the low nibbles are weights 0-15, the high ones 16-31 (Q4_0 and
    Q4_1) -> q [..., 32]."""
    return np.concatenate((packed & 15, packed >> 4), axis=-1)


def _q4_0(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 2 + 16)  # d, 16 bytes of nibbles
    d = _fp16(blocks, 0)
    return _nibbles_by_halves(blocks[..., 2:]), d, d * -8


def _q4_1(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 2 + 2 + 16)  # d, m, 16 bytes of nibbles
    return _nibbles_by_halves(blocks[..., 4:]), _fp16(blocks, 0), _fp16(blocks, 2)


def _q4_k(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 2 + 2 + 12 + 128)  # d, dmin, scales, nibbles
    d, dmin = _fp16(blocks, 0)[..., None], _fp16(blocks, 2)[..., None]
    sc, m = _q4_k_scales(blocks[..., 4:16])  # [N, superblocks, 8]
    # 32 bytes per pair of sub-blocks: sub-block 2j in their low nibbles, 2j + 1 in the high
    packed = blocks[..., 16:].reshape(*blocks.shape[:2], 4, 1, 32)
    q = np.concatenate((packed & 15, packed >> 4), axis=-2)  # [N, superblocks, 4, 2, 32]
    return q, d * sc, -(dmin * m)


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> eight 6-bit scales and eight 6-bit minima (llama.cpp's get_scale_min_k4):
    bytes 0-3 hold scales 0-3 and 4-7 minima 0-3 in their low 6 bits; bytes 8-11 hold
    scales 4-7 (low nibble) and minima 4-7 (high nibble), whose top 2 bits are the top 2
    bits of bytes 0-3 (scales) and 4-7 (minima)."""
    low, high, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate((low & 63, (rest & 15) | ((low >> 6) << 4)), axis=-1)
    minima = np.concatenate((high & 63, (rest >> 4) | ((high >> 6) << 4)), axis=-1)
    return scales.astype(np.float32), minima.astype(np.float32)
