"""Native decode attention over a 1 GiB KV cache on 4 KiB pages (as KVCache allocates it)
against transparent huge pages (as it did before 2026-12-03), the two alternating in
one process, process CPU time (docs/performance.md, "Host memory").

    python -m tests.perf.kv_page_size [--seqs 32] [--context 512] [--threads 1]

Every layer's attention (one NativeKernels.paged_attention call each) for `seqs`
sequences whose blocks are drawn at random from the whole cache: the most scattered
block tables, where page size matters most.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from app.model.config import ModelConfig
from app.model.families import read_model_config
from app.model.host_memory import advise_huge_pages
from app.model.kv_cache import GIB, KVCache, num_blocks_for_bytes
from app.native import native_kernels
from app.weights import default_model_dir

BLOCK_SIZE = 16


def cache_on(config: ModelConfig, num_blocks: int, huge_pages: bool) -> KVCache:
    cache = KVCache(config, num_blocks, BLOCK_SIZE, torch.device("cpu"), torch.float32)
    if huge_pages:  # the allocation KVCache made before: torch.empty, advised, 2 MiB-aligned
        numel = cache._storage.numel()
        raw = torch.empty(numel + (1 << 19), dtype=torch.float32)
        offset = (-raw.data_ptr() % (2 << 20)) // 4
        storage = raw[offset : offset + numel].view(cache._storage.shape)
        if not advise_huge_pages(storage):
            raise RuntimeError("the kernel refused huge pages")
        cache._storage = storage
        cache.layers = list(storage.unbind(0))
    cache._storage.normal_()  # every page written: no first-touch faults while timing
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = native_kernels()
    if native is None:
        raise SystemExit("the native kernels did not build")
    config = read_model_config(default_model_dir())
    num_blocks = num_blocks_for_bytes(config, BLOCK_SIZE, torch.float32, GIB)
    per_seq = -(-args.context // BLOCK_SIZE)
    if args.seqs * per_seq > num_blocks:
        raise SystemExit(f"{args.seqs} x {args.context} tokens do not fit {num_blocks} blocks")
    caches = {
        "4 KiB": cache_on(config, num_blocks, False),
        "2 MiB": cache_on(config, num_blocks, True),
    }
    generator = torch.Generator().manual_seed(0)
    tables = torch.randperm(num_blocks, generator=generator)[: args.seqs * per_seq]
    tables = tables.view(args.seqs, per_seq).to(torch.int32).contiguous()  # [S, blocks]
    token_seq = torch.arange(args.seqs, dtype=torch.int32)  # [S]: one decode token each
    num_keys = torch.full((args.seqs,), args.context, dtype=torch.int32)
    query = torch.randn(args.seqs, config.num_heads, config.head_dim, generator=generator)

    def step(cache: KVCache) -> float:
        start = time.process_time()
        for layer in cache.layers:
            native.paged_attention(query, layer[0], layer[1], tables, token_seq, num_keys, 0.125)
        return (time.process_time() - start) * 1000

    times: dict[str, list[float]] = {name: [] for name in caches}
    for cache in caches.values():
        step(cache)
    for round_index in range(args.rounds):
        order = list(caches) if round_index % 2 == 0 else list(reversed(caches))
        for name in order:
            times[name].append(step(caches[name]))
    for name, values in times.items():
        print(f"{name} pages: CPU ms per step, median {statistics.median(values):.2f}, "
              f"min {min(values):.2f}")  # fmt: skip
    small, huge = times["4 KiB"], times["2 MiB"]
    print(f"4 KiB / 2 MiB: median {statistics.median(small) / statistics.median(huge):.3f}, "
          f"min {min(small) / min(huge):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
