"""`NativeKernels`: typed entry points into the compiled library (kernels.c and its
parts), on fp32 CPU activations. load.py builds, loads and checks it."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

import torch

from app.native.build import Build
from app.native.panels import INT4, WEIGHT_KINDS, panel_shape, panels_fit
from app.native.stack import StackDesc, StepDesc, work_floats

_long, _float, _pointer = ctypes.c_long, ctypes.c_float, ctypes.c_void_p
# lamina_amx_status()'s answers (amx.h: AMX_NOT_BUILT, _REFUSED, _TURNED_OFF, _IN_USE)
AMX_STATUS = ("not built", "refused", "turned off", "in use")


class NativeKernels:
    """Typed entry points into the compiled library. Activations, outputs and the KV
    cache are fp32 on the CPU; weight panels are fp32, fp16, bf16 or int8 (blocks)."""

    def __init__(self, build: Build) -> None:
        self.build, self.path = build, build.path
        library = ctypes.CDLL(str(build.path))  # CDLL releases the GIL during each call
        # A clang build runs on LLVM's OpenMP runtime, not the libgomp torch loaded: its
        # thread count then follows torch's before each call (per calling thread, as
        # OpenMP keeps it), so the kernels use as many threads as torch whichever runtime.
        self.own_openmp = not _shares_torch_openmp(library)
        self._set_threads = library.omp_set_num_threads
        self._set_threads.argtypes, self._set_threads.restype = [ctypes.c_int], None
        matmul_args = (_pointer, _long, _pointer, ctypes.c_int32, _pointer, _pointer)
        self._matmul = _bind(library.lamina_matmul, matmul_args + (_long, _long, _long))
        pack_args = (_pointer, _pointer, _long, _long)
        self._pack = {  # by the panels' dtype
            torch.float32: _bind(library.lamina_pack_weight, pack_args),
            torch.float16: _bind(library.lamina_pack_weight_f16, pack_args),
            torch.bfloat16: _bind(library.lamina_pack_weight_bf16, pack_args),
            torch.int8: _bind(library.lamina_pack_weight_i8, pack_args),
            INT4: _bind(library.lamina_pack_weight_i4, pack_args),
        }
        # Whether bf16 matmuls run AVX512-BF16's dot product, or widen bf16 in the kernel
        # (the same bits but for denormals: bf16.h).
        self.bf16_dot_product = bool(library.lamina_bf16_dot_product())
        # Whether int8 and 4-bit matmuls run 16-row tiles on AMX (amx.h): an index into AMX_STATUS.
        # A library from before amx.h (tests.perf.kernel_ab's old one) has none.
        self._amx_status: Callable[[], int] = lambda: 0
        self._use_amx: Callable[[int], None] = lambda on: None
        # Whether bf16 matmuls take AMX tiles too, while AMX is in use (every row: amx.h).
        self.amx_bf16 = hasattr(library, "lamina_amx_bf16") and bool(library.lamina_amx_bf16())
        if hasattr(library, "lamina_amx_status"):
            self._amx_status = library.lamina_amx_status
            self._amx_status.argtypes, self._amx_status.restype = [], ctypes.c_int32
            self._use_amx = _bind(library.lamina_use_amx, (ctypes.c_int32,))
        attention_args = (_pointer, _long, _pointer, _pointer, _long, _long, _pointer, _long)
        attention_args += (_pointer, _pointer, _pointer, _long, _long, _long, _long, _float)
        attention_args += (_long, _float)  # window, softcap
        self._attention = _bind(library.lamina_paged_attention_windowed, attention_args)
        stack_args = (ctypes.POINTER(StackDesc), ctypes.POINTER(StepDesc))
        self._decoder_stack = _bind(library.lamina_decoder_stack, stack_args)
        argmax_args = (_pointer, _long, _long, _long, _pointer)
        self._argmax_rows = _bind(library.lamina_argmax_rows, argmax_args)
        self._fma_peak = library.lamina_fma_peak
        self._fma_peak.argtypes, self._fma_peak.restype = [_long], ctypes.c_double

    @property
    def amx_status(self) -> str:
        """AMX tiles for int8 and 4-bit matmuls, and bf16 ones where amx_bf16 (amx.h): "in use",
        "turned off" (use_amx), "refused" (by the OS) or "not built" (the compiler or the CPU
        has no AMX-INT8)."""
        return AMX_STATUS[self._amx_status()]

    def use_amx(self, on: bool) -> None:
        """AMX tiles off, or back on where built and permitted (the tests compare the bits;
        AMX is on by default). Not while a matmul runs."""
        self._use_amx(int(on))

    def _follow_torch_threads(self) -> None:
        """Before each call: the library's own OpenMP runtime uses torch's thread count."""
        if self.own_openmp:
            self._set_threads(torch.get_num_threads())

    def pack_weight(
        self,
        weight: torch.Tensor,
        allocate: Callable[..., torch.Tensor] = torch.empty,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A Linear's weight [N, K] (fp32) -> panels [ceil(N / 64), K, 64] in `dtype`
        (float32, or float16 rounded to nearest), or bfloat16 panels in K-pairs
        [ceil(N / 64), ceil(K / 2), 64, 2] (rounded to nearest even, denormals to zero:
        bf16.h), or int8 blocks [ceil(N / 64), K / 32, 2304] (a scale per column and 32 k,
        int8.h), or 4-bit blocks as bytes (dtype panels.INT4) [ceil(N / 64), K / 32,
        1536] (a scale and a minimum per column and 32 k, int4.h; K a multiple of 32);
        zeros past N (and K).

        allocate(shape, dtype=...) makes the uninitialised, contiguous panels tensor: the
        model passes a huge-page arena."""
        _check_fp32(weight)
        if dtype not in self._pack:
            raise ValueError(f"panels are float32, float16, bfloat16, int8 or int4, not {dtype}")
        weight = weight.contiguous()
        out_features, in_features = weight.shape
        panels = allocate(panel_shape(out_features, in_features, dtype), dtype=dtype)
        self._follow_torch_threads()
        self._pack[dtype](weight.data_ptr(), panels.data_ptr(), out_features, in_features)
        return panels

    def matmul(
        self, x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:  # x [M, K] (rows may be strided) -> [M, out_features]
        """x @ W.T + bias, with W packed by pack_weight (fp32, fp16 or bf16 panels; the
        products are summed in fp32 in every case; with bf16 panels x is rounded to bf16
        first; with int8 or 4-bit blocks each row of x is quantized to int8 per block of
        32 and each block's dot product is an exact int32 sum: int8.h)."""
        _check_fp32(x)
        if x.stride(-1) != 1:
            x = x.contiguous()
        num_rows, in_features = x.shape
        if not panels_fit(panels, in_features):
            raise ValueError(f"x has {in_features} features, the weight {panels.shape[1]}")
        out = torch.empty(num_rows, out_features)
        if num_rows:
            bias_pointer = None if bias is None else bias.data_ptr()
            self._follow_torch_threads()
            self._matmul(
                x.data_ptr(), x.stride(0), panels.data_ptr(), WEIGHT_KINDS[panels.dtype],
                bias_pointer, out.data_ptr(), num_rows, in_features, out_features,
            )  # fmt: skip
        return out

    def paged_attention(
        self,
        query: torch.Tensor,  # [N, num_heads, head_dim], head_dim contiguous, heads adjacent
        keys: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim], contiguous
        values: torch.Tensor,  # same layout as keys
        block_tables: torch.Tensor,  # [S, max_blocks] int32
        token_seq: torch.Tensor,  # [N] int32: each token's row of block_tables
        num_keys: torch.Tensor,  # [N] int32: keys each token attends over (position + 1)
        scale: float,
        sliding_window: int | None = None,  # then only the last sliding_window of those
        softcap: float | None = None,  # scores become softcap * tanh(scores / softcap)
    ) -> torch.Tensor:  # [N, num_heads * head_dim]
        """Each token's query heads over its first num_keys cached keys (GQA), or over the
        last `sliding_window` of them; scores soft-capped first with `softcap` (Gemma 2)."""
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads, num_blocks, block_size, _ = keys.shape
        if query.stride(2) != 1 or query.stride(1) != head_dim:
            query = query.contiguous()
        for tensor in (keys, values):
            if not tensor.is_contiguous():
                raise ValueError("the KV cache must be contiguous")
        for index in (block_tables, token_seq, num_keys):
            if index.dtype != torch.int32 or not index.is_contiguous():
                raise ValueError("block tables and token indices must be contiguous int32")
        out = torch.empty(num_tokens, num_heads * head_dim)
        if num_tokens:
            self._follow_torch_threads()
            self._attention(
                query.data_ptr(), query.stride(0), keys.data_ptr(), values.data_ptr(),
                num_blocks, block_size, block_tables.data_ptr(), block_tables.stride(0),
                token_seq.data_ptr(), num_keys.data_ptr(), out.data_ptr(),
                num_tokens, num_heads, num_kv_heads, head_dim, scale, sliding_window or 0,
                softcap or 0.0,
            )  # fmt: skip
        return out

    def decoder_stack(
        self,
        stack: StackDesc,  # describe_stack(...): the layers' weights and caches
        x: torch.Tensor,  # [N, hidden] fp32, contiguous: the residual stream, updated in place
        split: int,  # rows [0, split) are prompt tokens (their layers' prompt panels)
        cos: torch.Tensor,  # [N, head_dim]: each token's rotary cosines
        signed_sin: torch.Tensor,  # [N, head_dim]: its sines, negated on the first half
        slots: torch.Tensor,  # [N] int64: where each token's keys and values go
        block_tables: torch.Tensor,  # [S, max_blocks] int32
        token_seq: torch.Tensor,  # [N] int32
        num_keys: torch.Tensor,  # [N] int32: keys each token attends over (position + 1)
        local: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, signed sin [N,
        # head_dim] of the local_rope layers (needed when the stack has some)
    ) -> None:
        """Every layer of the stack over a step's tokens (stack.py). Slots outside the
        cache are refused here; block ids must lie inside it too, which the caller checks
        (attention.py does, once a step)."""
        num_tokens = x.shape[0]
        _check_step(stack, x, cos, signed_sin, slots, block_tables, token_seq, num_keys)
        if not 0 <= split <= num_tokens:
            raise ValueError(f"split {split} is outside 0..{num_tokens}")
        if getattr(stack, "local_rope", False) and local is None:
            raise ValueError("the stack has local_rope layers: pass their tables")
        local_cos, local_sin = local if local is not None else (cos, signed_sin)
        _check_rotary_tables(stack, x.shape[0], local_cos, local_sin)
        work = torch.empty(work_floats(stack, num_tokens))
        step = StepDesc(
            x.data_ptr(), num_tokens, split, cos.data_ptr(), signed_sin.data_ptr(),
            local_cos.data_ptr(), local_sin.data_ptr(), slots.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0),
            token_seq.data_ptr(), num_keys.data_ptr(), work.data_ptr(),
        )  # fmt: skip
        self._follow_torch_threads()
        self._decoder_stack(ctypes.byref(stack), ctypes.byref(step))

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, N] fp32 on the CPU (rows may be strided, no NaN) -> int64 [S]: each row's
        first index of its largest value, as torch.argmax(x, dim=-1) gives it."""
        _check_fp32(x)
        num_rows, num_columns = x.shape
        if num_rows and not num_columns:
            raise ValueError("argmax of empty rows")
        if x.stride(1) != 1:
            x = x.contiguous()
        out = torch.empty(num_rows, dtype=torch.int64)
        if num_rows:
            self._follow_torch_threads()
            self._argmax_rows(x.data_ptr(), x.stride(0), num_rows, num_columns, out.data_ptr())
        return out

    def fma_peak(self, seconds: float = 0.3) -> float:
        """FLOP/s of vector FMAs on registers, on every thread torch uses: the CPU's
        arithmetic ceiling, with no memory traffic. Best of three runs of ~seconds / 3."""
        iterations, best = 100_000, 0.0
        for attempt in range(4):  # the first run only sizes the others
            started = time.perf_counter()
            self._follow_torch_threads()
            flops = self._fma_peak(iterations)
            elapsed = time.perf_counter() - started
            if attempt:
                best = max(best, flops / elapsed)
            else:
                iterations = max(1, int(iterations * seconds / 3 / max(elapsed, 1e-6)))
        return best


def _shares_torch_openmp(library: ctypes.CDLL) -> bool:
    """Whether the library's OpenMP functions are those of the runtime torch loaded
    (libgomp, for torch's CPU wheels and a gcc build): then torch.set_num_threads sets
    the kernels' thread count too."""
    try:
        torch_runtime = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except OSError:  # torch runs on another runtime: assume nothing is shared
        return False

    def address(handle: ctypes.CDLL) -> int | None:
        return ctypes.cast(handle.omp_set_num_threads, ctypes.c_void_p).value

    return address(library) == address(torch_runtime)


def _check_step(stack: StackDesc, x: torch.Tensor, *tensors: torch.Tensor) -> None:
    cos, signed_sin, slots, block_tables, token_seq, num_keys = tensors
    num_tokens = x.shape[0]
    if x.dtype != torch.float32 or x.shape != (num_tokens, stack.hidden):
        raise ValueError(f"x must be fp32 [N, {stack.hidden}], got {x.dtype} {tuple(x.shape)}")
    _check_rotary_tables(stack, num_tokens, cos, signed_sin)
    if slots.dtype != torch.int64 or slots.shape != (num_tokens,):
        raise ValueError("slots must be int64 [N]")
    num_slots = stack.num_blocks * stack.block_size
    if num_tokens and not (int(slots.min()) >= 0 and int(slots.max()) < num_slots):
        raise ValueError("a slot lies outside the KV cache")
    for index in (block_tables, token_seq, num_keys):
        if index.dtype != torch.int32:
            raise ValueError("block tables and token indices must be int32")
    if token_seq.shape != (num_tokens,) or num_keys.shape != (num_tokens,):
        raise ValueError("token_seq and num_keys must have one entry per token")
    if not all(t.is_contiguous() for t in (x, *tensors)):
        raise ValueError("decoder stack inputs must be contiguous")


def _check_rotary_tables(stack: StackDesc, num_tokens: int, *tables: torch.Tensor) -> None:
    for table in tables:
        if table.dtype != torch.float32 or table.shape != (num_tokens, stack.head_dim):
            raise ValueError(f"rotary tables must be fp32 [N, {stack.head_dim}]")
        if not table.is_contiguous():
            raise ValueError("decoder stack inputs must be contiguous")


def _bind(function, argtypes: tuple) -> Callable[..., None]:
    """A library function with its C signature declared (ctypes then converts and checks
    the arguments), returning nothing."""
    function.argtypes = list(argtypes)
    function.restype = None
    return function


def _check_fp32(tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or tensor.dim() != 2:
        shape = tuple(tensor.shape)
        raise ValueError(f"expected a 2-D fp32 CPU tensor, got {tensor.dtype} {shape}")
