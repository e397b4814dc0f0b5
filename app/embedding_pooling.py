"""Which pooling turns a prompt's final hidden states into an embedding.

`LAMINA_EMBEDDING_POOLING` says `last` or `mean`; `auto` honours the model folder's own
sentence-transformers configuration (`modules.json` naming a Pooling module, whose
`config.json` sets one `pooling_mode_*`), the way sentence-transformers itself would
pool that model, and falls back to the last token, the natural summary of a causal
model's prompt. A mode lamina does not compute (CLS, max, weighted mean) is logged and
falls back too. No torch here: the HTTP layer reads it.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from app.core import Pooling

logger = logging.getLogger("lamina.api")

POOLING_MODULE = "sentence_transformers.models.Pooling"
# sentence-transformers' flags -> lamina's pooling; the other flags have no counterpart
MODES: dict[str, Pooling] = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}
DEFAULT: Pooling = "last"


def model_pooling_config(model_dir: Path) -> dict | None:
    """The folder's sentence-transformers Pooling config, or None when it has none."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and module.get("type") == POOLING_MODULE:
            try:
                return json.loads((model_dir / module.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                return None
    return None


_warned: set[Path] = set()  # folders whose pooling mode was already logged as unsupported


def resolve_pooling(setting: str, model_dir: Path) -> Pooling:
    """The pooling of `setting` (Settings.embedding_pooling) for the model in `model_dir`
    (read each time: two small files, and a folder may be replaced)."""
    if setting in ("last", "mean"):
        return setting  # type: ignore[return-value]
    config = model_pooling_config(model_dir)
    if config is None:
        return DEFAULT
    chosen = [pooling for flag, pooling in MODES.items() if config.get(flag)]
    if len(chosen) == 1:
        return chosen[0]
    asked = sorted(
        flag for flag, value in config.items() if flag.startswith("pooling_mode_") and value
    )
    logger.warning(
        "the model's sentence-transformers pooling %s is not one lamina computes "
        "(last token or mean); embeddings pool the last token",
        asked,
    )
    return DEFAULT


def hidden_size(model_dir: Path) -> int | None:
    """The length of the model's hidden states (config.json), None when it does not say."""
    return _hidden_size(str(model_dir))


@functools.lru_cache(maxsize=8)
def _hidden_size(model_dir: str) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("hidden_size", "d_model", "n_embd"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
