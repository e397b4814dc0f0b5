"""How many KV blocks to allocate: a fixed budget on the CPU, what is left on a GPU.

On CUDA the budget is measured: run the two largest steps the server will ever run (a
full prefill chunk, and a decode step of the largest batch at the longest context,
whose gathered keys and values are the biggest transient buffers), then give the cache
`gpu_memory_utilization` of the device minus everything in use and that peak.
"""

from __future__ import annotations

import torch

from app.config import Settings
from app.model.attention import AttentionGroup, AttentionMetadata, build_attention_metadata
from app.model.config import ModelConfig
from app.model.kv_cache import GIB, KVCache, bytes_per_block
from app.model.llama import LlamaForCausalLM

MAX_PROFILED_DECODE_BATCH = 256  # the largest CUDA-graph batch bucket


def num_cache_blocks(
    model: LlamaForCausalLM,
    settings: Settings,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    draft_config: ModelConfig | None = None,
) -> int:
    """CPU: kv_cache_gb (GiB) for the served model's cache (a draft model's cache of as
    many blocks comes on top, reported apart). CUDA: what gpu_memory_utilization leaves
    after profiling, shared block for block with the draft model's cache when there is
    one (`draft_config`; the draft's weights are loaded already, so they count as used)."""
    if device.type == "cuda" and settings.num_gpu_blocks_override:
        return settings.num_gpu_blocks_override
    per_block = bytes_per_block(model.config, settings.block_size, dtype)
    if device.type == "cuda":
        if draft_config is not None:
            per_block += bytes_per_block(draft_config, settings.block_size, dtype)
        budget = cuda_cache_budget_bytes(model, settings, device, dtype, max_model_len)
    else:
        budget = settings.kv_cache_gb * GIB
    num_blocks = int(budget // per_block)
    if num_blocks < 1:
        raise RuntimeError(
            f"no memory left for the KV cache (budget {budget / GIB:.2f} GiB, "
            f"{per_block} bytes per block): raise kv_cache_gb or gpu_memory_utilization"
        )
    return num_blocks


def cuda_cache_budget_bytes(
    model: LlamaForCausalLM,
    settings: Settings,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
) -> float:
    """Run the largest steps we will ever run, then give the cache what is left."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        _profile_prefill(model, settings, device, dtype, max_model_len)
        _profile_decode(model, settings, device, dtype, max_model_len)
    torch.cuda.synchronize(device)
    peak_bytes = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    activation_bytes = peak_bytes - torch.cuda.memory_allocated(device)
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    used_bytes = total_bytes - free_bytes  # our weights, CUDA context, other processes
    # CUDA graphs keep their own pool of activations: leave room for one more peak.
    graph_bytes = activation_bytes if settings.cuda_graphs else 0
    return (
        total_bytes * settings.gpu_memory_utilization - used_bytes - activation_bytes - graph_bytes
    )


def _profile_prefill(model, settings, device, dtype, max_model_len) -> None:
    num_tokens = min(settings.max_num_batched_tokens, max_model_len)
    block_size = settings.block_size
    scratch = KVCache(model.config, -(-num_tokens // block_size), block_size, device, dtype)
    positions, metadata = build_attention_metadata(
        [num_tokens],
        [0],
        [list(range(scratch.num_blocks))],
        block_size,
        scratch.num_allocated_blocks,
        model.config.num_kv_heads,
        device,
        batch_invariant=settings.batch_invariant,
        backend=_profiled_backend(model),
        mask_dtype=dtype,
        local_window=model.config.local_window,
    )
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model(ids, positions, metadata, scratch)
    num_logit_rows = min(settings.max_num_seqs, num_tokens)
    model.compute_logits(hidden[:num_logit_rows]).float().softmax(-1)


def _profile_decode(model, settings, device, dtype, max_model_len) -> None:
    """A decode step of the largest batch, every sequence at the longest context (all of
    them reading one block over and over: the gathers are as large, the cache is not)."""
    block_size = settings.block_size
    batch = min(settings.max_num_seqs, MAX_PROFILED_DECODE_BATCH)
    num_keys = -(-max_model_len // block_size) * block_size
    scratch = KVCache(model.config, 1, block_size, device, dtype)
    num_rows = batch * model.config.num_kv_heads * (num_keys // block_size)
    group = AttentionGroup(
        row_start=0,
        row_end=batch,
        num_seqs=batch,
        num_keys=num_keys,
        kv_rows=torch.zeros(num_rows, dtype=torch.int64, device=device),
        mask=torch.zeros(batch, 1, num_keys, dtype=dtype, device=device),
        is_decode=True,
    )
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device),
        groups=[group],
        num_decode_tokens=batch,
        backend=_profiled_backend(model),
    )
    metadata.local = metadata  # local layers read the same keys: as large, windowed or not
    zeros = torch.zeros(batch, dtype=torch.int64, device=device)
    hidden = model(zeros, zeros, metadata, scratch)
    model.compute_logits(hidden).float().softmax(-1)


def _profiled_backend(model) -> str:
    """The CUDA backend the model's attention takes: "sdpa", or "bmm" for soft-capped
    scores (Gemma 2)."""
    return "bmm" if model.attention_backend == "bmm" else "sdpa"
