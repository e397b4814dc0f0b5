"""The draft model of speculative decoding (`LAMINA_SPECULATIVE=draft`): a second, small
model loaded beside the served one, with a KV cache of its own, run by a ModelRunner
of its own on the engine thread (app/engine/speculative_draft.py drives it).

It must share the served model's tokenizer: its token ids are fed to the served model
as draft tokens, so they must mean the same text. Start-up refuses a draft whose
vocabulary (every token string and its id) differs, or whose logits are wider than the
served model's (it could propose an id the served model has no embedding for).

LAMINA_SPECULATIVE_MODEL takes what LAMINA_MODEL takes (a folder, a .gguf file, a hub id);
every refusal names it, in one line, like a refused LAMINA_MODEL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from app.model.config import ModelConfig, ModelLoadError, read_config_json
from app.model.families import read_model_config
from app.model.kv_cache import GIB, KVCache
from app.weights_source import resolve_model_folder

logger = logging.getLogger(__name__)

DRAFT_SETTING = "LAMINA_SPECULATIVE_MODEL"


class DraftModelError(ModelLoadError):
    """The configured draft model cannot draft for the served one (a ModelLoadError: the
    server reports it in one line, as a model it cannot run)."""


def read_draft_config(speculative_model: str | Path) -> tuple[Path, ModelConfig]:
    """The draft model's local folder (a .gguf file or a hub id becomes one, as for
    LAMINA_MODEL) and its config. ModelSourceError or DraftModelError, naming
    LAMINA_SPECULATIVE_MODEL, when it names no model lamina runs."""
    folder = resolve_model_folder(speculative_model, setting=DRAFT_SETTING)
    try:
        read_config_json(folder, setting=DRAFT_SETTING)
        return folder, read_model_config(folder)
    except ModelLoadError as exc:
        raise DraftModelError(f"the draft model {folder} ({DRAFT_SETTING}): {exc}") from None


def check_draft_vocabulary(
    target_dir: Path, draft_dir: Path, target: ModelConfig, draft: ModelConfig
) -> None:
    """Raise DraftModelError unless the two folders' tokenizers have the same vocabulary
    and the draft's logits are no wider than the target's."""
    if not _same_tokenizer_files(target_dir, draft_dir):
        _check_same_vocabulary(target_dir, draft_dir)
    if draft.vocab_size > target.vocab_size:
        raise DraftModelError(
            f"the draft model {draft_dir} has {draft.vocab_size} logits, more than the served "
            f"model's {target.vocab_size}: it could propose ids the served model lacks"
        )


def _same_tokenizer_files(target_dir: Path, draft_dir: Path) -> bool:
    """Both folders hold the same tokenizer.json, byte for byte (a model drafting for
    itself in another precision, a cut of it): nothing to compare token by token."""
    target_file, draft_file = target_dir / "tokenizer.json", draft_dir / "tokenizer.json"
    if not (target_file.is_file() and draft_file.is_file()):
        return False
    return target_file.read_bytes() == draft_file.read_bytes()


def _check_same_vocabulary(target_dir: Path, draft_dir: Path) -> None:
    """Every (token string, id) pair of one tokenizer is the other's."""
    from transformers import AutoTokenizer  # lazy: keeps `import app` light

    def vocabulary(folder: Path) -> dict[str, int]:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()

    target_vocab, draft_vocab = vocabulary(target_dir), vocabulary(draft_dir)
    if target_vocab != draft_vocab:
        differing = sorted(
            set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1]
        )
        examples = ", ".join(f"{token!r}={token_id}" for token, token_id in differing[:3])
        raise DraftModelError(
            f"the draft model {draft_dir} does not share the served model's tokenizer: "
            f"{len(target_vocab)} and {len(draft_vocab)} tokens, {len(differing)} (token, id) "
            f"pairs in one only (e.g. {examples}); {DRAFT_SETTING} must name a model "
            "with the same vocabulary"
        )


def load_draft_model(
    settings,  # noqa: ANN001 - app.config.Settings
    target_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    weight_dtype: torch.dtype | None,
) -> torch.nn.Module:
    """The draft model on the served model's device and dtype (weight_dtype: its
    linear-weight storage, None for the model dtype). Loaded before the served model's
    KV cache is sized, so that on a GPU the memory it takes is not promised to that cache."""
    from app.model.loader import load_model

    draft_dir, draft_config = read_draft_config(settings.speculative_model)
    check_draft_vocabulary(Path(settings.model), draft_dir, target_config, draft_config)
    if draft_config.max_position_embeddings < max_model_len:
        logger.warning(
            "the draft model's max_position_embeddings %d is below max_model_len %d: its "
            "drafts for longer contexts may be poor (never wrong: they are verified)",
            draft_config.max_position_embeddings,
            max_model_len,
        )
    model = load_model(
        draft_dir,
        device,
        dtype,
        max_positions=max_model_len,
        weight_dtype=weight_dtype,
        batch_invariant=settings.batch_invariant,
        kernels="auto" if settings.native_kernels else "torch",
    )
    logger.info("draft model %s: %d layers", draft_dir, draft_config.num_layers)
    return model


def draft_kv_cache(
    draft_config: ModelConfig,
    num_blocks: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> KVCache:
    """The draft's KV cache: as many blocks (of the same size) as the served model's, since
    a draft shadows at most the served model's running sequences."""
    kv_cache = KVCache(draft_config, num_blocks, block_size, device, dtype)
    logger.info(
        "the draft model's KV cache: %d blocks of %d tokens (%.2f GiB)",
        kv_cache.num_blocks,
        kv_cache.block_size,
        kv_cache.num_bytes / GIB,
    )
    return kv_cache
