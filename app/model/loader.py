"""Read a local Hugging Face model folder (a family of families.py): its config.json and
its safetensors weights, or the GGUF file a folder written for it links to
(app/model/gguf_folder.py), dequantized tensor by tensor.

Only safetensors and GGUF are read: pickle checkpoints (*.bin, *.pt) can run code when
loaded.
The model is built on the meta device (no memory, no random init) and the checkpoint
tensors are assigned into it, after q/k/v and gate/up are merged into single weights
so every layer runs two matmuls fewer per step.

Checkpoint tensors are views of the file's memory map until something copies them: the
kernels re-lay the linear weights out into memory of their own, and what is left (the
embedding, the norms) is copied once loading ends, so the map, which holds the whole
file resident once it was read, is released with the last view.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from app.model.checkpoint_names import (
    MERGED_PARTS,
    NUM_PARTS,
    RENAMED,
    TOP_LEVEL,
    split_layer_name,
)
from app.model.config import ModelConfig, ModelLoadError, read_config_json
from app.model.families import build_model, read_model_config
from app.model.fused_layers import why_not_fused
from app.model.generic import load_generic
from app.model.gguf_folder import TENSOR_TABLE
from app.model.linear import kernel_plan
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


def checkpoint_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) of the folder's checkpoint: its safetensors, or the .gguf
    file and tensor table of a folder gguf_folder.py wrote."""
    table = model_dir / TENSOR_TABLE
    ggufs = sorted(model_dir.glob("*.gguf"))
    if table.is_file() and len(ggufs) == 1:
        from app.model.gguf import iter_gguf_tensors

        config = read_config_json(model_dir)
        return iter_gguf_tensors(ggufs[0], config, json.loads(table.read_text()))
    return _iter_checkpoint(safetensors_files(model_dir))


def _iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, reader.get_tensor(name)


def convert_checkpoint(
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """HF tensor names -> our state dict, on `device` in `dtype`, with merged projections."""
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved it; we recompute it from the config
        tensor = tensor.to(device=device, dtype=dtype)
        if name in TOP_LEVEL:
            state[TOP_LEVEL[name]] = tensor
            continue
        parts = split_layer_name(name)
        if parts is None:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint")
        layer, module, kind = parts
        if module in RENAMED:
            state[f"{layer}.{RENAMED[module]}.{kind}"] = tensor
        elif module in MERGED_PARTS:
            merged, position = MERGED_PARTS[module]
            key = f"{layer}.{merged}.{kind}"
            slots = pending.setdefault(key, [None] * NUM_PARTS[merged])
            slots[position] = tensor
            if all(part is not None for part in slots):
                state[key] = torch.cat(slots, dim=0)
                del pending[key]
        else:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint")
    if pending:
        raise ModelLoadError(f"checkpoint lacks parts of: {', '.join(sorted(pending))}")
    if config.tie_word_embeddings:
        # The head reuses the embedding matrix; a saved copy (some checkpoints keep one)
        # is ignored, exactly as transformers does for tied models.
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


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
    tensors = checkpoint_tensors(model_dir)
    with torch.device("meta"):
        model = build_model(config)
    state = convert_checkpoint(tensors, config, device, dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint does not match config.json: {exc}") from None
    # A tied head is the embedding again: count each tensor once.
    num_parameters = sum({t.data_ptr(): t.numel() for t in state.values()}.values())
    del state  # the modules hold what they need; nothing else may keep checkpoint views
    plan = kernel_plan(device, dtype, weight_dtype, batch_invariant, kernels)
    if plan is not None and plan.weight_dtype == INT4 and (model_dir / TENSOR_TABLE).is_file():
        from app.model.gguf_int4 import use_files_int4_blocks

        use_files_int4_blocks(model, model_dir, json.loads((model_dir / TENSOR_TABLE).read_text()))
    model.finish_loading(device, max_positions or config.max_position_embeddings, plan)
    if device.type == "cpu":
        _copy_out_of_checkpoint(model)
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


def _copy_out_of_checkpoint(model: torch.nn.Module) -> None:
    """Give every parameter still held memory of its own (a tied weight stays one).

    On the CPU an unconverted parameter is a view of the checkpoint's memory map, which
    keeps the whole file mapped and resident; the copies let the map go.
    """
    copies: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in copies:
                copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
            setattr(module, name, copies[id(param)])


def _kernel_note(plan) -> str:
    if plan is None:
        return ""
    if plan.uses_native_matmul:
        return " (lamina native kernels)"
    notes = " (oneDNN packed)" if plan.use_onednn else ""
    if plan.native is not None:
        notes += " (native attention)"
    return notes
