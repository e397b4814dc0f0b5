"""Where the weights come from: what LAMINA_MODEL names, turned into a local folder.

LAMINA_MODEL accepts
- a local Hugging Face folder (config.json, *.safetensors, tokenizer files);
- a single `.gguf` file: its metadata becomes a folder of its own (config, tokenizer,
  chat template) and its tensors are dequantized at load (app/model/gguf_folder.py).
  A GGUF file is known by its name or, without the suffix, by its magic bytes: Ollama
  keeps its models as blobs named `sha256-<digest>`;
- a hub repository id, `org/name` or `org/name@revision`, that is not a local path:
  fetched with huggingface_hub into its standard cache (HF_HOME / HF_HUB_CACHE) when the
  network allows, and read from that cache offline (HF_HUB_OFFLINE=1).

`parse_model_spec` only looks at the text and the file system; `resolve_model_folder`
does the work (a download, a GGUF's metadata) and runs where the model loads. Every
failure is a ModelSourceError whose message is one line saying what would work.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# `org/name`, optionally `@revision` (a branch, a tag or a commit hash).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
# The first bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
# What a hub snapshot needs: no pickle checkpoints, no GGUF copies of the same weights.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


logger = logging.getLogger(__name__)


class ModelSourceError(ValueError):
    """LAMINA_MODEL names nothing lamina can load; the message is one line."""


@dataclass(frozen=True)
class ModelSpec:
    """LAMINA_MODEL, classified: a folder, a .gguf file or a hub repository id."""

    kind: Literal["folder", "gguf", "hub"]
    text: str  # as given
    path: Path | None = None  # folder and gguf
    repo_id: str | None = None  # hub
    revision: str | None = None  # hub; None: the default branch

    @property
    def served_name(self) -> str:
        """The model's default id in the API: the folder's name, the file's stem, the
        repository id."""
        if self.kind == "hub":
            return str(self.repo_id)
        assert self.path is not None
        return self.path.stem if self.kind == "gguf" else self.path.name


def parse_model_spec(value: str | Path) -> ModelSpec:
    """Classify LAMINA_MODEL. A path that exists, or looks like one (leading `/`, `.` or
    `~`), is local; a missing `org/name[@rev]` is a hub id. A `.gguf` name, or a file
    that starts as GGUF files do (an Ollama blob), is a GGUF file."""
    text = str(value)
    path = Path(text).expanduser()
    if text.endswith(".gguf") or _starts_as_gguf(path):
        return ModelSpec("gguf", text, path=path)
    match = _HUB_ID.match(text)
    if path.exists() or match is None or text.startswith((".", "/", "~")):
        return ModelSpec("folder", text, path=path)
    return ModelSpec("hub", text, repo_id=match["repo"], revision=match["rev"])


def _starts_as_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with path.open("rb") as file:
            return file.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:  # unreadable: the loader names the problem
        return False


def resolve_model_folder(value: str | Path, setting: str = "LAMINA_MODEL") -> Path:
    """The local folder holding the model LAMINA_MODEL names (blocking: may download).

    ModelSourceError when there is none, naming `setting` (the variable that holds value:
    LAMINA_SPECULATIVE_MODEL takes the same forms); a folder's contents are checked by the
    loader.
    """
    spec = parse_model_spec(value)
    if spec.kind == "hub":
        return hub_snapshot(spec, setting)
    assert spec.path is not None
    if spec.kind == "gguf":
        from app.model.config import ModelLoadError
        from app.model.gguf_folder import gguf_folder

        try:
            return gguf_folder(spec.path)
        except ModelLoadError as exc:
            raise ModelSourceError(str(exc)) from None
    if not spec.path.is_dir():
        default_hint = "run `lamina weights` to prepare the default model, or "
        raise ModelSourceError(
            f"model folder {spec.path} does not exist: "
            f"{default_hint if setting == 'LAMINA_MODEL' else ''}set {setting} to a Hugging "
            "Face folder, a .gguf file or a hub id (org/name[@revision])"
        )
    return spec.path


def hub_snapshot(spec: ModelSpec, setting: str = "LAMINA_MODEL") -> Path:
    """The repository's snapshot folder in the hub cache, downloaded there if the network
    allows (huggingface_hub falls back to the cache when it does not)."""
    from huggingface_hub import constants, snapshot_download

    revision = spec.revision or "main"
    try:
        folder = snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=HUB_FILES)
    except Exception as exc:  # huggingface_hub raises a family of HTTP and cache errors
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        reason = " ".join(str(exc).split())
        raise ModelSourceError(
            f"hub model {spec.repo_id} at revision {revision} is neither downloadable{offline} "
            f"nor in the hub cache {constants.HF_HUB_CACHE} ({type(exc).__name__}: "
            f"{reason[:300]}); {setting} {spec.text!r} is not a local folder either"
        ) from None
    logger.info("hub model %s at revision %s: %s", spec.repo_id, revision, folder)
    return Path(folder)
