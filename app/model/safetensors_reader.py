"""Read a safetensors file tensor by tensor into memory of each tensor's own, with plain
reads: no memory map.

A map (safetensors' safe_open) keeps every page the load has read resident until the
last view of it is gone, so a streamed load (layer_stream.py) would still hold the whole
file beside the packed copies: 1.7 GB for a 0.9B model in bf16. Read, a tensor is one
buffer that dies once its layer is packed, and the file's pages stay in the page cache,
which the kernel reclaims as it needs. The format: an 8-byte little-endian header size,
a JSON header naming each tensor's dtype, shape and byte range, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from app.model.config import ModelLoadError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_HEADER_SIZE_BYTES = 8
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the file, in name order (safe_open's order)."""
    with open(path, "rb") as file:
        header, data_start = _header(file, path)
        file_size = path.stat().st_size
        for name in sorted(header):
            dtype, shape, (begin, end) = _entry(header, name, path)
            if not data_start <= data_start + begin <= data_start + end <= file_size:
                raise ModelLoadError(f"{path}: tensor {name!r} lies past the end of the file")
            tensor = torch.empty(end - begin, dtype=torch.uint8)
            file.seek(data_start + begin)
            if file.readinto(tensor.numpy()) != end - begin:
                raise ModelLoadError(f"{path}: tensor {name!r} was cut short")
            yield name, tensor.view(dtype).reshape(shape)


def _header(file, path: Path) -> tuple[dict, int]:
    """The JSON header (without __metadata__) and where the data starts."""
    try:
        (size,) = struct.unpack("<Q", file.read(_HEADER_SIZE_BYTES))
        # Checked before it is read: another file in the weights' place (a Git LFS
        # pointer, a web page) gives a size of exabytes, which read() would allocate.
        if size > min(_MAX_HEADER_BYTES, path.stat().st_size - _HEADER_SIZE_BYTES):
            raise ValueError(f"a header of {size} bytes")
        header = json.loads(file.read(size))
    except (struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not (isinstance(entry, dict) and entry.keys() >= _ENTRY_FIELDS):
            raise ModelLoadError(
                f"{path}: not a safetensors file (tensor {name!r} lacks one of "
                f"{', '.join(sorted(_ENTRY_FIELDS))})"
            )
    return header, _HEADER_SIZE_BYTES + size


def _entry(header: dict, name: str, path: Path) -> tuple[torch.dtype, list[int], list[int]]:
    entry = header[name]
    dtype = _DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ModelLoadError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, "
                             f"which lamina does not read ({', '.join(_DTYPES)})")  # fmt: skip
    shape, offsets = entry["shape"], entry["data_offsets"]
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise ModelLoadError(f"{path}: tensor {name!r}'s bytes do not match its shape {shape}")
    return dtype, shape, offsets
