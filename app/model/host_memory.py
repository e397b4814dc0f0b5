"""Host memory settings that matter for CPU inference (Linux with glibc; no-ops elsewhere).

Two measured problems (docs/performance.md), both from running on 4 KiB pages:
- torch's CPU allocator hands large tensors to malloc, which maps them fresh from the
  kernel and unmaps them on free, so every step page-faults its activations and
  gathered K/V in again. Raising glibc's mmap and trim thresholds keeps freed memory
  in the heap for the next step: attention's block gathers ran 2.5x faster.
- decode attention gathers scattered KV blocks from a cache of a gigabyte or more;
  with 4 KiB pages nearly every block is a TLB miss. Transparent huge pages for the
  cache (the kernel's THP mode is often `madvise`, as on this machine) made the gathers
  another 2.5x faster. The weights are read in long sequential runs and gained nothing
  with oneDNN; with lamina's native matmul, which reads a single stream's weights close
  to memory speed, they did gain: `HugePageArena` (16.9 -> 15.0 ms for all matmuls of
  one token).

The KV cache is the exception to huge pages: it is reserved at start-up but should cost
memory only as sequences use it, so it lives on an anonymous mapping (`lazy_zeros`) that
the kernel backs with zero pages on first touch, 4 KiB at a time (see kv_cache.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import os
import sys

import torch

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling on 64-bit
_TRIM_THRESHOLD_BYTES = 512 << 20  # keep up to this much freed memory for reuse
_MADV_HUGEPAGE = 14
_MADV_NOHUGEPAGE = 15
_HUGE_PAGE_BYTES = 2 << 20


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "madvise"):
        return None  # not glibc (musl has no mallopt)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def keep_freed_memory_in_heap() -> bool:
    """Process-wide: malloc serves allocations up to 32 MiB from the heap and keeps freed
    memory, so per-step tensors reuse already-mapped pages. True if applied."""
    libc = _libc()
    if libc is None:
        return False
    applied = libc.mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD_BYTES) == 1
    applied = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and applied
    if applied:
        logger.debug("malloc keeps freed memory (mmap threshold 32 MiB, trim 512 MiB)")
    return applied


def release_freed_heap() -> bool:
    """Give the free memory malloc keeps (the raised trim threshold above) back to the
    kernel once: loading leaves hundreds of MiB of freed checkpoint copies in the heaps
    of the threads that loaded. True if glibc's malloc_trim ran."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor on an anonymous mapping of its own, backed page by page
    on first touch: what is never written costs no memory (on Linux; elsewhere the
    platform's anonymous mmap, also zero-filled). 4 KiB pages, never transparent huge
    ones, so resident memory follows what is touched, not 2 MiB around it."""
    nbytes = max(1, math.prod(shape) * dtype.itemsize)
    # Private, not mmap's default shared: shared anonymous memory is shmem, whose pages
    # follow the shmem huge-page policy and count as shared in the RSS.
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # THP "always" would back 2 MiB per touch
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    return raw.view(dtype).view(shape)


def resident_bytes(tensor: torch.Tensor) -> int | None:
    """How much of a CPU tensor's memory is resident now (whole pages it touches);
    None where the kernel cannot say (not Linux, not glibc, or not the CPU)."""
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    num_pages = -(-(end - start) // page)
    flags = (ctypes.c_ubyte * num_pages)()
    if libc.mincore(start, end - start, flags) != 0:
        return None
    return sum(flag & 1 for flag in bytes(flags)) * page


def process_rss_bytes() -> int | None:
    """This process's resident set size (VmRSS), None where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for transparent huge pages under a CPU tensor's memory, before first touch.

    Only the 2 MiB-aligned interior can use huge pages. True if the kernel accepted.
    """
    if tensor.device.type != "cpu":
        return False
    libc = _libc()
    if libc is None:
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    aligned_start = -(-start // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
    aligned_end = end // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
    if aligned_end <= aligned_start:
        return False
    return libc.madvise(aligned_start, aligned_end - aligned_start, _MADV_HUGEPAGE) == 0


class HugePageArena:
    """Hands out CPU tensors carved from large chunks advised for transparent huge pages.

    For weights read in full for every token: one arena per model, so the whole of it
    sits on 2 MiB pages instead of 135,000 4 KiB ones (fewer TLB misses). Views keep
    their chunk alive; the arena holds only the chunk it is filling.
    """

    CHUNK_BYTES = 64 << 20
    ALIGN_BYTES = 64  # every tensor starts on a cache line

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None  # uint8, its usable part 2 MiB-aligned
        self._used = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised tensor of `shape` inside the arena."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._chunk is None or self._used + nbytes > self._chunk.numel():
            self._chunk = self._new_chunk(max(self.chunk_bytes, nbytes))
            self._used = 0
        view = self._chunk[self._used : self._used + nbytes]
        self._used += -(-nbytes // self.ALIGN_BYTES) * self.ALIGN_BYTES
        return view.view(dtype).view(shape)

    @staticmethod
    def _new_chunk(nbytes: int) -> torch.Tensor:
        raw = torch.empty(nbytes + _HUGE_PAGE_BYTES, dtype=torch.uint8)
        offset = -raw.data_ptr() % _HUGE_PAGE_BYTES
        chunk = raw[offset : offset + nbytes]
        advise_huge_pages(chunk)  # before anything touches it
        return chunk
