"""Read a local Hugging Face model folder (a family of families.py): its config.json and
its safetensors weights, or the GGUF file a folder written for it links to
(app/model/gguf_folder.py), dequantized tensor by tensor.

Only safetensors and GGUF are read: pickle checkpoints (*.bin, *.pt) can run code when
loaded.
The model is built on the meta device (no memory, no random init) and the checkpoint
tensors are assigned into it, after q/k/v and gate/up are merged into single weights
so every layer runs two matmuls fewer per step. Each decoder layer's linear weights are
packed into their served storage as soon as the layer is loaded (layer_stream.py), so a
load holds the served model plus one layer at the model dtype; a GGUF file's 4-bit
projections served as int4 are read from its blocks and never dequantized, and so is its
Q8_0 embedding (app/model/embedding.py).

Checkpoint tensors are read from the files into memory of their own, not mapped
(safetensors_reader.py, gguf.py): a map would keep every page read resident until the
load ends, the whole file beside the packed copies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from app.model.config import ModelLoadError, read_config_json
from app.model.embedding import use_files_q8_0_embedding
from app.model.families import build_model, read_model_config
from app.model.fused_layers import why_not_fused
from app.model.generic import load_generic
from app.model.gguf_folder import TENSOR_TABLE
from app.model.layer_stream import load_by_layer
from app.model.linear import kernel_plan
from app.model.safetensors_reader import read_safetensors
from app.native.panels import INT4

logger = logging.getLogger(__name__)


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
    raise ModelLoadError(
        f"no *.safetensors weights in {model_dir}{hint}; LAMINA_MODEL may also name a .gguf file"
    )


def gguf_checkpoint(model_dir: Path) -> tuple[Path, list[dict]] | None:
    """The .gguf file and tensor table of a folder gguf_folder.py wrote; None for a
    safetensors folder."""
    table = model_dir / TENSOR_TABLE
    ggufs = sorted(model_dir.glob("*.gguf"))
    if table.is_file() and len(ggufs) == 1:
        return ggufs[0], json.loads(table.read_text())
    return None


def checkpoint_tensors(
    model_dir: Path,
    gguf: tuple[Path, list[dict]] | None,
    from_file: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) of the folder's checkpoint: its safetensors, or the
    `gguf` file and tensor table (gguf_checkpoint) of a folder gguf_folder.py wrote (the
    weights named in `from_file`, which the kernels read from its blocks, as shapes on
    the meta device)."""
    if gguf is not None:
        from app.model.gguf import iter_gguf_tensors

        path, table = gguf
        return iter_gguf_tensors(path, read_config_json(model_dir), table, from_file)
    return _iter_checkpoint(safetensors_files(model_dir))


def _iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        yield from read_safetensors(path)


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
    """Build the family's model from a local folder, ready for inference on `device`.

    `max_positions` sizes the rotary cos/sin table (default: max_position_embeddings).
    `weight_dtype` (CPU only) stores linear weights in another precision; `kernels`
    "auto" picks the fastest matmul kernels for the device, "reference" keeps
    F.linear on the weights as loaded (for tests that inspect them).
    """

    device = torch.device(device)
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    if config.generic:
        safetensors_files(model_dir)  # refuses pickles and empty folders, naming them
        return _load_generic(
            model_dir, config, device, dtype, weight_dtype, batch_invariant, kernels
        )
    logger.info("backend: native (lamina's own %s code)", config.architecture)
    plan = kernel_plan(device, dtype, weight_dtype, batch_invariant, kernels)
    with torch.device("meta"):
        model = build_model(config)
    from_file: frozenset[str] = frozenset()  # weights read from a GGUF file's blocks
    gguf = gguf_checkpoint(model_dir)
    if gguf is not None:
        gguf_path, table = gguf
        from_file = use_files_q8_0_embedding(model, gguf_path, table)
        if plan is not None and plan.weight_dtype == INT4:
            from app.model.gguf_int4 import use_files_int4_blocks

            from_file |= use_files_int4_blocks(model, model_dir, table)
    # Each layer is packed as soon as it is loaded: one layer at `dtype` at a time.
    num_parameters = load_by_layer(
        model,
        checkpoint_tensors(model_dir, gguf, from_file),
        config,
        device,
        dtype,
        lambda module: model.pack_linears(module, plan),
    )
    model.finish_loading(device, max_positions or config.max_position_embeddings, plan)
    _refuse_unread(model)
    reason = why_not_fused(model)
    model.fuse_layers = reason is None  # the path fused_layers.run_decoder takes
    logger.info(
        "decoder layers: %s",
        "lamina's fused native stack, one call per step" if reason is None
        else f"one op at a time: {reason}",
    )  # fmt: skip
    logger.info(
        "loaded %s (%s): %d layers, %.1fM parameters, %s on %s, linear weights %s%s",
        Path(model_dir).name,
        config.architecture,
        config.num_layers,
        num_parameters / 1e6,
        dtype,
        device,
        plan.weight_dtype if plan else dtype,
        _kernel_note(plan),
    )
    return model.eval()


def _load_generic(model_dir, config, device, dtype, weight_dtype, batch_invariant, kernels):
    """transformers' modules with lamina's paged attention and linear kernels (generic.py),
    at the model dtype."""
    plan = kernel_plan(device, dtype, None, batch_invariant, kernels)
    if weight_dtype is not None:
        logger.warning("weight_dtype applies to the native families only: ignored for %s",
                       config.architecture)  # fmt: skip
    return load_generic(model_dir, config, device, dtype, plan)


def _refuse_unread(model: torch.nn.Module) -> None:
    """A weight left on the meta device (read from the file at packing, but never packed)
    would fail at the first step: fail at load instead, naming it."""
    unread = [name for name, param in model.named_parameters() if param.is_meta]
    if unread:
        raise RuntimeError(f"weights never read from the checkpoint: {', '.join(unread)}")


def _kernel_note(plan) -> str:
    if plan is None:
        return ""
    if plan.uses_native_matmul:
        return " (lamina native kernels)"
    notes = " (oneDNN packed)" if plan.use_onednn else ""
    if plan.native is not None:
        notes += " (native attention)"
    return notes
