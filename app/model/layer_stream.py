"""Checkpoint tensors into a meta-built model, one decoder layer at a time.

The checkpoint's tensors are renamed to lamina's modules and q/k/v and gate/up merged
(two matmuls fewer per layer and step). A decoder layer is assigned as soon as the
checkpoint has given all of its tensors, and the caller packs it then (`on_module`:
its linear weights into their served storage, which drops the loaded copies), so a load
holds one layer at the model dtype beside what is served, not the whole model: an 8B
model in 4 bits starts in about its served size plus one layer, not 32 GB of fp32. An
untied head is handed over the same way; the embedding, the norms and a tied head wait
for the end (finish_loading). The embedding keeps a bf16 or fp16 file's dtype under an
fp32 model (embedding.py: every value exact, half the memory).

A tensor on the meta device stands for a weight the kernels read from the file itself
(a GGUF file's 4-bit blocks, gguf_int4.py): only its shape is needed, so it is never
dequantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from app.model.checkpoint_names import (
    MERGED_PARTS,
    NUM_PARTS,
    RENAMED,
    TOP_LEVEL,
    split_layer_name,
)
from app.model.config import ModelConfig, ModelLoadError
from app.model.embedding import stored_dtype

_HEAD = "lm_head"
_EMBEDDING = "model.embed_tokens.weight"


def converted_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) -> (our state-dict name, tensor on `device` in `dtype`), a merged
    projection once all of its parts have come."""
    pending: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved it; we recompute it from the config
        # The embedding keeps a narrower file dtype the model dtype holds exactly
        target = stored_dtype(tensor.dtype, dtype) if name == _EMBEDDING else dtype
        tensor = _to(tensor, device, target)
        if name in TOP_LEVEL:
            yield TOP_LEVEL[name], tensor
            continue
        parts = split_layer_name(name)
        if parts is None:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint")
        layer, module, kind = parts
        if module in RENAMED:
            yield f"{layer}.{RENAMED[module]}.{kind}", tensor
        elif module in MERGED_PARTS:
            merged, position = MERGED_PARTS[module]
            key = f"{layer}.{merged}.{kind}"
            slots = pending.setdefault(key, [None] * NUM_PARTS[merged])
            slots[position] = tensor
            del tensor, slots  # only `pending` holds the parts, so they die with the merge
            if all(part is not None for part in pending[key]):
                yield key, _merge(pending.pop(key))
        else:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint")
    if pending:
        raise ModelLoadError(f"checkpoint lacks parts of: {', '.join(sorted(pending))}")


def _merge(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts' rows one after another: [sum of rows, in_features]."""
    if parts[0].is_meta:  # all of them (gguf_int4.int4_storage): the shape is enough
        # (torch.cat on the meta device imports sympy: 68 MiB and a second of start-up)
        rows = sum(part.shape[0] for part in parts)
        return torch.empty(rows, *parts[0].shape[1:], dtype=parts[0].dtype, device="meta")
    return torch.cat(parts, dim=0)


def _to(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_meta:  # read from the file at packing: only the shape travels
        return tensor.to(dtype=dtype)
    return tensor.to(device=device, dtype=dtype)


def load_by_layer(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    on_module: Callable[[nn.Module], None],
) -> int:
    """Assign the checkpoint's tensors into `model` (built on the meta device): each
    decoder layer, and an untied head, as soon as it is complete, then `on_module(it)`;
    the rest at the end. Returns the number of parameters the checkpoint gave (a tied
    head counted once). ModelLoadError when the checkpoint does not fit the model."""
    expected = _expected_groups(model, config)
    held: dict[str, dict[str, torch.Tensor]] = {}
    completed: set[str] = set()
    num_parameters = 0
    for key, tensor in converted_tensors(tensors, device, dtype):
        if key == f"{_HEAD}.weight" and config.tie_word_embeddings:
            # The head reuses the embedding matrix; a saved copy (some checkpoints keep
            # one) is ignored, exactly as transformers does for tied models.
            continue
        group, local = _split_group(key, expected)
        held.setdefault(group, {})[local] = tensor
        num_parameters += tensor.numel()
        del tensor  # the group holds it: once packed, nothing else may
        if group and held[group].keys() == expected[group]:
            module = model.get_submodule(group)
            _assign(module, group, held.pop(group))
            completed.add(group)
            on_module(module)
    rest = {_join(group, local): tensor
            for group, state in held.items() for local, tensor in state.items()}  # fmt: skip
    held.clear()
    _assign_rest(model, rest, expected, completed)
    return num_parameters


def _expected_groups(model: nn.Module, config: ModelConfig) -> dict[str, set[str]]:
    """The state-dict names each group needs: "layers.3" -> {"input_norm.weight", ...},
    "lm_head" -> {"weight"} when untied, "" -> the rest (embedding, final norm)."""
    groups: dict[str, set[str]] = {}
    for name in model.state_dict():
        if name.startswith(f"{_HEAD}.") and config.tie_word_embeddings:
            continue  # the embedding, re-tied by finish_loading
        group, local = _split_group(name, None)
        groups.setdefault(group, set()).add(local)
    return groups


def _split_group(key: str, expected: dict[str, set[str]] | None) -> tuple[str, str]:
    """A state-dict name -> (its group, its name in the group): 'layers.3.attn.o_proj.weight'
    -> ('layers.3', 'attn.o_proj.weight'), 'lm_head.weight' -> ('lm_head', 'weight'), any
    other -> ('', name); so is a name of a group not in `expected` (a layer the config
    does not have: refused at the end)."""
    if key.startswith("layers."):
        index, local = key.removeprefix("layers.").split(".", 1)
        group = f"layers.{index}"
    elif key.startswith(f"{_HEAD}."):
        group, local = _HEAD, key.removeprefix(f"{_HEAD}.")
    else:
        return "", key
    if expected is not None and group not in expected:
        return "", key
    return group, local


def _join(group: str, local: str) -> str:
    return f"{group}.{local}" if group else local


def _assign(module: nn.Module, group: str, state: dict[str, torch.Tensor]) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # a shape: torch's lines, on one
        why = " ".join(str(exc).split())
        raise ModelLoadError(f"checkpoint does not match config.json in {group}: {why}") from None


def _assign_rest(
    model: nn.Module,
    rest: dict[str, torch.Tensor],
    expected: dict[str, set[str]],
    completed: set[str],
) -> None:
    """The tensors of no complete group; refuses names the model lacks or does not have."""
    try:
        unexpected = model.load_state_dict(rest, strict=False, assign=True).unexpected_keys
    except RuntimeError as exc:
        why = " ".join(str(exc).split())
        raise ModelLoadError(f"checkpoint does not match config.json: {why}") from None
    missing = sorted(
        _join(group, local)
        for group, names in expected.items()
        if group not in completed
        for local in names
        if _join(group, local) not in rest
    )
    problems = [f"{what}: {', '.join(names)}"
                for what, names in (("missing", missing), ("unexpected", sorted(unexpected)))
                if names]  # fmt: skip
    if problems:
        raise ModelLoadError(f"checkpoint does not match config.json: {'; '.join(problems)}")
