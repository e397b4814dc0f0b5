"""Where a loaded model's host memory goes, for the start-up log.

One line names every large allocation: the weights as loaded and still held (the
embedding, norms, any weight a kernel reads in place), the copies the matmul kernels
re-laid out for themselves (packed panels), the rotary tables, the KV cache reserved and
the part of it written so far, the draft model's weights and cache when speculation uses
one, and the process's resident set. What the RSS holds beyond those is torch's and
Python's own (libraries, allocator caches, thread stacks, the tokenizers), reported as
the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from app.model.host_memory import process_rss_bytes
from app.model.kv_cache import KVCache
from app.model.linear import Linear

logger = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True)
class MemoryReport:
    """Bytes, as measured after loading (and warm-up, when the caller ran it)."""

    weights: int  # parameters the modules hold: embedding, norms, weights read in place
    packed: int  # the kernels' own copies of the linear weights (panels, oneDNN blocks)
    tables: int  # rotary cos/sin tables
    kv_reserved: int  # the KV cache's full size
    kv_resident: int | None  # the part of it backed by memory now (CPU; None: unknown)
    rss: int | None  # the process's resident set (None: no /proc)
    draft: DraftMemory | None = None  # speculation's draft model, when one is loaded

    @property
    def rest(self) -> int | None:
        """RSS beyond what is accounted above: torch, Python, libraries, heaps."""
        if self.rss is None:
            return None
        kv = self.kv_reserved if self.kv_resident is None else self.kv_resident
        draft = 0 if self.draft is None else self.draft.held
        return self.rss - self.weights - self.packed - self.tables - kv - draft

    def log(self, device: torch.device) -> None:
        on_cpu = device.type == "cpu"
        draft = self.draft
        logger.info(
            "memory: weights %.0f MiB + packed copies %.0f MiB + rope tables %.0f MiB on %s; "
            "KV cache %.0f MiB reserved, %s written; %sprocess RSS %s (rest: %s)",
            self.weights / MIB,
            self.packed / MIB,
            self.tables / MIB,
            device,
            self.kv_reserved / MIB,
            _mib(self.kv_resident) if on_cpu else "all",
            "" if draft is None else draft.describe(on_cpu) + "; ",
            _mib(self.rss),
            _mib(self.rest) if on_cpu else "host only",
            extra={
                "weights_bytes": self.weights,
                "packed_weights_bytes": self.packed,
                "rope_table_bytes": self.tables,
                "kv_cache_reserved_bytes": self.kv_reserved,
                "kv_cache_resident_bytes": self.kv_resident,
                "rss_bytes": self.rss,
                **({} if draft is None else draft.log_fields()),
            },
        )


@dataclass(frozen=True)
class DraftMemory:
    """The draft model of speculative decoding: its own weights and KV cache, bytes."""

    model: int  # its weights, packed copies and rope tables
    kv_reserved: int
    kv_resident: int | None

    @property
    def held(self) -> int:
        """What it adds to the resident set: the model and the cache's written part."""
        return self.model + (self.kv_reserved if self.kv_resident is None else self.kv_resident)

    def describe(self, on_cpu: bool) -> str:
        written = _mib(self.kv_resident) if on_cpu else "all"
        return (
            f"draft model {_mib(self.model)} + its KV cache {_mib(self.kv_reserved)} "
            f"reserved, {written} written"
        )

    def log_fields(self) -> dict[str, int | None]:
        return {
            "draft_model_bytes": self.model,
            "draft_kv_cache_reserved_bytes": self.kv_reserved,
            "draft_kv_cache_resident_bytes": self.kv_resident,
        }


def measure_memory(
    model: torch.nn.Module,
    kv_cache: KVCache,
    draft: tuple[torch.nn.Module, KVCache] | None = None,
) -> MemoryReport:
    """Sum the model's and the cache's tensors, each storage once (a tied weight held by
    two modules counts once; two copies of it count twice); `draft`: speculation's draft
    model and its cache, reported on their own."""
    seen: set[tuple[int, int]] = set()
    weights, packed, tables = _model_bytes(model, seen)
    draft_memory = None
    if draft is not None:
        draft_model, draft_cache = draft
        draft_memory = DraftMemory(
            model=sum(_model_bytes(draft_model, seen)),
            kv_reserved=draft_cache.num_bytes,
            kv_resident=draft_cache.num_resident_bytes,
        )
    return MemoryReport(
        weights=weights,
        packed=packed,
        tables=tables,
        kv_reserved=kv_cache.num_bytes,
        kv_resident=kv_cache.num_resident_bytes,
        rss=process_rss_bytes(),
        draft=draft_memory,
    )


def _model_bytes(model: torch.nn.Module, seen: set[tuple[int, int]]) -> tuple[int, int, int]:
    """(parameters, the kernels' packed copies, rope tables) of `model`, bytes not in `seen`."""
    weights = _sum_unique(model.parameters(), seen)
    kernel_tensors = [
        tensor
        for module in model.modules()
        if isinstance(module, Linear)
        for kernel in (module.kernel, module.prompt_kernel)
        if kernel is not None
        for tensor in _tensors_of(kernel)
    ]
    packed = _sum_unique(kernel_tensors, seen)
    rotary = getattr(model, "rotary", None)
    tables = _sum_unique(_tensors_of(rotary), seen) if rotary is not None else 0
    return weights, packed, tables


def _tensors_of(holder: object) -> list[torch.Tensor]:
    """The tensors an object holds as attributes (a kernel's panels, bias, packed blocks)."""
    return [value for value in vars(holder).values() if isinstance(value, torch.Tensor)]


def _sum_unique(tensors, seen: set[tuple[int, int]]) -> int:
    total = 0
    for tensor in tensors:
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's bytes start and how many: panels are views into shared arena
    chunks, so the storage alone would count a chunk once for all its tensors."""
    if tensor.is_mkldnn:  # oneDNN's opaque packed weights have no data pointer to share
        return id(tensor), 0
    return tensor.data_ptr(), tensor.numel() * tensor.element_size()


def _mib(num_bytes: int | None) -> str:
    return "unknown" if num_bytes is None else f"{num_bytes / MIB:.0f} MiB"
