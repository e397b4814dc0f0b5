"""A .gguf file seen as a Hugging Face folder: config.json, generation_config.json and
the tokenizer files (with its chat template) written from the file's metadata, beside a
link to the file itself, whose tensors the loader dequantizes at load (app/model/gguf.py).

Every other part of lamina (tokenizer, grammar compiler, EOS ids, benchmarks) reads a
folder, so it needs nothing GGUF-specific. The folder is small (the tokenizer is most of
it) and cached by the file's path, size and modification time: building it parses the
vocabulary twice (seconds), a later start reuses it. It is built in a temporary folder
and renamed into place, so a crash never leaves half a folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from app.model.config import ModelLoadError
from app.model.gguf import gguf_config, open_gguf, tensor_table
from app.model.gguf_int4 import EXACT_INT4_TYPES, WIDER_THAN_4_BITS, projection_types

logger = logging.getLogger(__name__)

# Bump when the folder's contents change, so older cached folders are not reused.
_LAYOUT_VERSION = "1"
_DONE_MARKER = "config.json"  # written last into the staging folder
TENSOR_TABLE = "gguf_tensors.json"


def gguf_cache_dir() -> Path:
    """Where GGUF folders live: the user's cache, beside the native kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lamina" / "gguf"


def gguf_folder(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The Hugging Face folder standing for `gguf_path`, built on first use.

    ModelLoadError (one line naming the file and the field) when lamina cannot serve it.
    """
    gguf_path = gguf_path.expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    cache_dir = cache_dir or gguf_cache_dir()
    stat = gguf_path.stat()
    key = f"{_LAYOUT_VERSION}\0{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir / f"{gguf_path.stem}-{digest}"
    if (folder / _DONE_MARKER).is_file():
        return folder
    try:
        _build(gguf_path, cache_dir, folder)
    except OSError as exc:  # a read-only home, a full disk
        raise ModelLoadError(
            f"cannot write the folder for {gguf_path.name} into {cache_dir} ({exc}): point "
            "XDG_CACHE_HOME at a writable folder"
        ) from None
    logger.info("GGUF metadata of %s written to %s", gguf_path.name, folder)
    return folder


def _build(gguf_path: Path, cache_dir: Path, folder: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".tmp-gguf-") as tmp:
        staged = Path(tmp) / "folder"
        staged.mkdir()
        _write_folder(gguf_path, staged)
        try:
            os.replace(staged, folder)
        except OSError:
            if not (folder / _DONE_MARKER).is_file():  # not another process's copy: retry
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(staged, folder)


# The projections' GGML type -> the weight storage that keeps their values. Q8_0 blocks
# are lamina's int8 blocks (32 weights, scale = largest / 127: llama.cpp's quantizer
# gives the largest q = +-127), so they come back bit for bit.
_WEIGHT_DTYPE_OF_TYPE = {"F32": None, "F16": "float16", "BF16": "bfloat16", "Q8_0": "int8"}


def file_weight_dtype(folder: Path) -> str | None:
    """LAMINA_WEIGHT_DTYPE's `auto` for a folder written from a GGUF file: the storage
    that keeps its projections' precision (None: the model dtype, for F32 files and
    safetensors folders).

    int4 where the 4-bit projections are Q4_0, Q4_1 or Q4_K, which int4 packs from the
    file's own blocks (gguf_int4.py; wider ones, as Q4_K_M's Q6_K, in int8 blocks): the
    file's values exactly, in two thirds of int8's memory, and on a 2-vCPU Xeon with AMX
    1.28-1.29x int8's tokens/s for one stream, 1.06-1.07x at 8, 0.91-0.93x at 32
    (docs/gguf-and-hub-models.md). int8 for any other quantized file (Q2_K, Q3_K, IQ types):
    within 1/32 of a 4-bit step of its values, where int4 would requantize them."""
    path = folder / TENSOR_TABLE
    if not path.is_file():
        return None
    types = set(projection_types(json.loads(path.read_text())).values())
    if len(types) == 1 and next(iter(types)) in _WEIGHT_DTYPE_OF_TYPE:
        return _WEIGHT_DTYPE_OF_TYPE[next(iter(types))]
    if types <= {"F32", "F16", "BF16"}:
        return None  # mixed float types: the model dtype holds them all
    if types & set(EXACT_INT4_TYPES) and types <= set(EXACT_INT4_TYPES) | WIDER_THAN_4_BITS:
        return "int4"
    return "int8"


def transformers_kwargs(folder: Path) -> dict[str, str]:
    """What transformers' from_pretrained needs to read `folder`'s weights: the GGUF's
    name for a folder written here, nothing for a safetensors folder."""
    if not (folder / TENSOR_TABLE).is_file():
        return {}
    return {"gguf_file": next(folder.glob("*.gguf")).name}


def _write_folder(gguf_path: Path, out: Path) -> None:
    reader = open_gguf(gguf_path)
    raw = gguf_config(reader, gguf_path)  # every check, before any writing
    (out / TENSOR_TABLE).write_text(json.dumps(tensor_table(reader)) + "\n")
    del reader  # its memory map: the tokenizer reads the file again
    _write_tokenizer(gguf_path, out)
    generation = {k: raw[k] for k in ("bos_token_id", "eos_token_id") if raw[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    # The loader finds the weights as the folder's *.gguf: an Ollama blob
    # (sha256-<digest>) has no suffix of its own.
    link_name = gguf_path.name if gguf_path.suffix == ".gguf" else f"{gguf_path.name}.gguf"
    (out / link_name).symlink_to(gguf_path)
    (out / _DONE_MARKER).write_text(json.dumps(raw, indent=2) + "\n")


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    """transformers builds the tokenizer (and its chat template) from the metadata."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers' converters raise many kinds
        raise ModelLoadError(
            f"{gguf_path}: transformers cannot build a tokenizer from tokenizer.ggml.* "
            f"({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from None
    tokenizer.save_pretrained(str(out))
