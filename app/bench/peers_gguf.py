"""The served model as GGUF files for llama.cpp: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K_M.

F32, F16, BF16 and Q8_0 come from llama.cpp's own converter (`convert_hf_to_gguf.py
--outtype`, run with the `gguf-py` of the same sources); Q4_0 and Q4_1 from `llama-quantize` on
the F32 file (with its default choice of types for the token embedding and output,
what a user of llama.cpp gets). The files are cached under
`~/.cache/lamina/llama.cpp/models/<folder>-<content hash>/`, so a changed model folder
gets new files and an unchanged one is converted once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from app.bench.peers_build import LlamaCpp, cache_root

# GGUF type -> the converter's --outtype; the 4-bit types are not: llama-quantize makes them.
CONVERTER_OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
QUANTIZED_FROM_F32 = ("Q4_0", "Q4_1", "Q4_K_M")


def model_content_hash(folder: Path) -> str:
    """SHA-256 over every file of the folder (relative name and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def gguf_dir(folder: Path, content_hash: str) -> Path:
    return cache_root() / "models" / f"{folder.name}-{content_hash[:16]}"


def converter_command(llama: LlamaCpp, folder: Path, gguf_type: str, out: Path) -> list[str]:
    """convert_hf_to_gguf.py's command line for one of CONVERTER_OUTTYPES."""
    if llama.converter is None:
        raise ValueError("no llama.cpp sources: the converter is needed for GGUF files")
    return [
        sys.executable, str(llama.converter), str(folder),
        "--outtype", CONVERTER_OUTTYPES[gguf_type], "--outfile", str(out),
    ]  # fmt: skip


def quantize_command(llama: LlamaCpp, source: Path, gguf_type: str, out: Path) -> list[str]:
    """llama-quantize's command line: `source` (an F32 GGUF) to `gguf_type`."""
    if llama.quantize is None:
        raise ValueError(f"no llama-quantize beside {llama.server}: {gguf_type} needs it")
    return [str(llama.quantize), str(source), str(out), gguf_type]


def converter_env(llama: LlamaCpp) -> dict[str, str]:
    """The converter imports `gguf` from its own sources, whatever the venv has."""
    assert llama.source_dir is not None
    gguf_py = str(llama.source_dir / "gguf-py")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": gguf_py + (os.pathsep + path if path else "")}


def ensure_gguf(llama: LlamaCpp, folder: Path, gguf_type: str, into: Path, log=print) -> Path:
    """`into`/`gguf_type`.gguf (`into`: gguf_dir of the folder), converted when absent."""
    target = into / f"{gguf_type}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    if gguf_type in CONVERTER_OUTTYPES:
        command = converter_command(llama, folder, gguf_type, partial)
        env = converter_env(llama)
    elif gguf_type in QUANTIZED_FROM_F32:
        command = quantize_command(
            llama, ensure_gguf(llama, folder, "F32", into, log), gguf_type, partial
        )
        env = None
    else:
        raise ValueError(f"no way to make a {gguf_type} GGUF file")
    log(f"[peers] converting {folder.name} to GGUF {gguf_type} ...")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    partial.replace(target)  # atomic: a half-written file is never taken as cached
    return target
