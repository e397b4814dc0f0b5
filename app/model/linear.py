"""Matmul kernels for the model's linear layers, chosen once after loading.

fp32 on the CPU uses lamina's own kernel (app/native) when it could be compiled: it
reads a single stream's weights ~40 % faster than oneDNN, matches it at many rows, and
computes every row the same way whatever the row count, so it needs no padding for
batch invariance. It also reads fp16 weights and bf16 ones (summing in fp32; bf16 with
each input row rounded to bf16, as oneDNN's bf16 matmul does, through AVX512-BF16 dot
products where the CPU has them: app/native/bf16.h). Without a C compiler, the torch
kernels below take over.

`Linear` keeps the checkpoint's weight ([out_features, in_features]) until
`prepare_for_inference` picks a kernel for the device and the requested weight precision,
re-lays the weight out for that kernel and drops the original. Measured on a 2-core
Zen 4 CPU (docs/performance.md): oneDNN with a pre-packed fp32 weight runs the whole
model's matmuls 1.8x faster than `F.linear` at 32 rows and 1.9x at 1 row; fp16 weights
with `F.linear` halve the bytes a single stream reads per token; bf16 weights through
oneDNN (only without native kernels) use the CPU's bf16 instructions when it has them,
but oneDNN picks its kernel by row count on AMX CPUs, so rows are then not batch
invariant (a warning says so at start-up).

With fp16 weights a Linear keeps a second kernel at the model dtype (native, or packed
oneDNN) for the rows of prompt tokens (`KernelPlan.prompt`): prompts are computed exactly
as the default precision computes them (same TTFT; torch's fp16 gemv is also slow on
many rows) and only generated tokens read the fp16 weights. The runner says per step
which rows are which (`RowKinds`). A row's kind depends only on its token (its position
against its sequence's prompt length), never on the step it lands in, so every token is
computed the same way whatever the batch, the chunking or a recompute after preemption.
The price is memory: both copies of every weight are kept. bf16 weights keep one copy,
for every row: prompts too are computed with bf16 weights.

Batch invariance: a row of `x @ W` must not depend on how many other rows the matmul
has, or a request's tokens would depend on its batch mates. Kernels often switch code
paths for tiny M (a gemv for one row), so `RowInvariance` finds, per kernel and shape,
the smallest row count from which results no longer change, and inputs with fewer
rows are padded up to it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from app.model.host_memory import HugePageArena
from app.native import NativeKernels, native_kernels
from app.native.panels import (
    BLOCK_BYTES,
    INT4,
    WEIGHT_KINDS,
    Int4Blocks,
    fits_blocks,
    pack_int4,
    weight_kind_name,
)

logger = logging.getLogger(__name__)

# Row counts probed when calibrating invariance: the small sizes where kernels switch
# paths, odd sizes, and the sizes decode and prefill steps typically have.
PROBE_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 31, 32, 33, 64, 65, 128, 200)
MAX_PADDED_ROWS = 8  # beyond this, padding costs more than invariance is worth: give up


@dataclass(frozen=True)
class KernelPlan:
    """How every Linear of a model computes. Built once by the loader from the settings."""

    device: torch.device
    activation_dtype: torch.dtype  # the model dtype: what Linear takes and returns
    weight_dtype: torch.dtype  # how weights are stored (and the matmul runs)
    use_onednn: bool  # pre-packed oneDNN weights (CPU); else torch's F.linear
    batch_invariant: bool  # pad tiny row counts so every row is computed the same way
    # The kernel family for the rows of prompt tokens when it differs (fp16 weights on the
    # CPU: the model dtype's plan); None: every row uses this plan's kernel.
    prompt: KernelPlan | None = None
    # lamina's compiled CPU kernels (fp32 activations), None where unavailable or not
    # wanted: fp32 weights then use them instead of oneDNN, and so does attention.
    native: NativeKernels | None = None
    # Where native kernels put their packed weights: huge pages, one arena per model.
    arena: HugePageArena = field(default_factory=HugePageArena, compare=False, repr=False)

    @property
    def uses_native_matmul(self) -> bool:
        """fp32, fp16, bf16, int8 or int4 weights (the native kernel sums their products in
        fp32)."""
        return self.native is not None and self.weight_dtype in WEIGHT_KINDS


def head_plan(plan: KernelPlan) -> KernelPlan:
    """The plan of the output head: the model's, except that 4-bit weights keep the head
    in int8 blocks. The head alone picks each token: in 4 bits it costs the default model
    13 % of fp32's greedy choices (87.3 % teacher-forced agreement, 100 % with an int8
    head; llama.cpp's 4-bit files keep theirs at 6 or 8 bits too)."""
    if plan.weight_dtype == INT4:
        return dataclasses.replace(plan, weight_dtype=torch.int8)
    return plan


PROMPT, GENERATED = "prompt", "generated"


@dataclass(frozen=True)
class RowKinds:
    """Which rows of a step's matmul inputs are prompt tokens and which generated ones.

    Built by the runner for models whose plan has a prompt kernel. A row is of prompt
    kind when its position is below its sequence's prompt length, whichever step
    computes it. `uniform` is set when every row has that kind (the common case: no
    split); otherwise both index tensors are.
    """

    uniform: str | None  # PROMPT, GENERATED, or None when the rows are mixed
    prompt_rows: torch.Tensor | None = None  # [P] int64, ascending; only when mixed
    generated_rows: torch.Tensor | None = None  # [G] int64, ascending; only when mixed

    @classmethod
    def from_flags(cls, is_prompt: list[bool], device: torch.device) -> RowKinds:
        """is_prompt [N]: the kind of each row, in row order."""
        num_prompt = sum(is_prompt)
        if num_prompt == len(is_prompt):
            return ALL_PROMPT
        if num_prompt == 0:
            return ALL_GENERATED
        flags = torch.tensor(is_prompt, dtype=torch.bool)
        prompt_rows = flags.nonzero().squeeze(1)  # [P]
        generated_rows = (~flags).nonzero().squeeze(1)  # [G]
        return cls(None, prompt_rows.to(device), generated_rows.to(device))


ALL_PROMPT = RowKinds(PROMPT)
ALL_GENERATED = RowKinds(GENERATED)


def onednn_available(weight_dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can run oneDNN linear with packed weights."""
    if not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        probe = torch.ones(16, 16, dtype=weight_dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, None)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def cpu_native_kernels(activation_dtype: torch.dtype, allow_native: bool) -> NativeKernels | None:
    """lamina's native CPU kernels when they run a model: fp32 activations, allowed, and
    built (or shipped) for this CPU; else None."""
    if allow_native and activation_dtype == torch.float32:
        return native_kernels()
    return None


def cpu_kernel_plan(
    activation_dtype: torch.dtype,
    weight_dtype: torch.dtype | None,
    batch_invariant: bool,
    allow_native: bool = True,
) -> KernelPlan:
    """The fastest measured kernel family for the CPU (see the module docstring)."""
    weight_dtype = weight_dtype or activation_dtype
    native = cpu_native_kernels(activation_dtype, allow_native)
    if weight_dtype in BLOCK_BYTES and native is None:
        raise ValueError(
            f"{weight_kind_name(weight_dtype)} weights run on lamina's native kernels only, "
            "which need fp32 activations (LAMINA_DTYPE=float32) and LAMINA_NATIVE_KERNELS=true "
            "on a CPU they build or ship for; "
            "use LAMINA_WEIGHT_DTYPE=bfloat16 or float16 otherwise"
        )
    # fp32 and bf16 without native kernels go through packed oneDNN. fp16 has no fast
    # batched oneDNN path without AVX512-FP16/AMX-FP16: native kernels read fp16 panels,
    # else F.linear's fp16 gemv (the fast single-stream torch kernel).
    wants_onednn = native is None and weight_dtype in (torch.float32, torch.bfloat16)
    use_onednn = wants_onednn and onednn_available(weight_dtype)
    if native is None and weight_dtype == torch.bfloat16 and batch_invariant:
        if activation_dtype != torch.float32:
            why = f"they take fp32 activations, not {activation_dtype}"
        else:
            why = "unavailable here" if allow_native else "turned off"
        logger.warning(
            "bf16 weights run on torch's kernels (lamina's native kernels: %s): oneDNN picks "
            "its bf16 kernel by row count on some CPUs (AMX), so there a row's bits may "
            "depend on its batch mates; batch invariance is only guaranteed by the native "
            "kernels",
            why,
        )
    if wants_onednn and not use_onednn:
        logger.warning("oneDNN linear is unavailable for %s: using F.linear", weight_dtype)
    prompt = None
    if weight_dtype == torch.float16 and activation_dtype != torch.float16:
        # Prompt rows take the model dtype's kernel: prompts computed as in fp32.
        prompt = cpu_kernel_plan(activation_dtype, None, batch_invariant, allow_native)
    return KernelPlan(
        torch.device("cpu"),
        activation_dtype,
        weight_dtype,
        use_onednn,
        batch_invariant,
        prompt,
        native,
    )


def kernel_plan(
    device: torch.device,
    dtype: torch.dtype,
    weight_dtype: torch.dtype | None,
    batch_invariant: bool,
    kernels: str = "auto",
) -> KernelPlan | None:
    """The plan for a model on `device`; None: F.linear on the weights as loaded.

    kernels: "auto" (lamina's native CPU kernels where they build, else torch's),
    "torch" (torch's fastest kernels only), "reference" (F.linear as loaded).
    """
    if kernels not in ("auto", "torch", "reference"):
        raise ValueError(f"kernels must be 'auto', 'torch' or 'reference', not {kernels!r}")
    if kernels == "reference":
        if weight_dtype not in (None, dtype):
            raise ValueError("reference kernels compute with the weights as loaded")
        return None
    if device.type == "cpu":
        return cpu_kernel_plan(dtype, weight_dtype, batch_invariant, kernels == "auto")
    if weight_dtype not in (None, dtype):
        logger.warning("weight_dtype applies to the CPU only; %s keeps %s", device, dtype)
    # CUDA: cuBLAS through F.linear, calibrated for row invariance like the CPU kernels.
    return KernelPlan(device, dtype, dtype, False, batch_invariant)


class RowInvariance:
    """Calibrates and caches, per kernel shape, the row count below which rows differ.

    One instance per model: shapes repeat across layers, so each is probed once.
    """

    def __init__(self) -> None:
        self._min_rows: dict[tuple, int] = {}

    def min_rows(
        self, key: tuple, row_op, in_features: int, device: torch.device, dtype: torch.dtype
    ) -> int:
        """Smallest M such that row_op gives every row the same bits for any M >= it.

        row_op(x [M, in_features] of dtype) -> [M, out]. Probes PROBE_ROWS with random data.
        """
        if key not in self._min_rows:
            self._min_rows[key] = calibrate_min_rows(row_op, in_features, device, dtype)
            logger.debug("row invariance of %s: pad to %d rows", key, self._min_rows[key])
        return self._min_rows[key]


def calibrate_min_rows(
    row_op, in_features: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> int:
    """Smallest probed M from which row_op(x [M, in_features]) gives rows M-independent bits.

    Returns 1 (with a warning) when no M up to MAX_PADDED_ROWS works.
    """
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(max(PROBE_ROWS), in_features, generator=generator).to(device, dtype)
    # Row 0 and a later row of every probe, so first-row and edge-of-tile paths both count.
    tail_row = 4
    first, tail = {}, {}
    for m in PROBE_ROWS:
        out = row_op(inputs[:m].clone())
        first[m] = out[0].clone()
        if m > tail_row:
            tail[m] = out[tail_row].clone()
    for m0 in PROBE_ROWS:
        if m0 > MAX_PADDED_ROWS:
            break
        firsts = [row for m, row in first.items() if m >= m0]
        tails = [row for m, row in tail.items() if m >= m0]
        if _all_equal(firsts) and _all_equal(tails):
            return m0
    logger.warning(
        "no row count up to %d makes this matmul batch invariant: results may depend on "
        "batch composition",
        MAX_PADDED_ROWS,
    )
    return 1


def pad_rows(x: torch.Tensor, min_rows: int) -> torch.Tensor:
    """x [M, K] with zero rows appended up to min_rows (a copy only when M is smaller)."""
    if x.shape[0] >= min_rows:
        return x
    return F.pad(x, (0, 0, 0, min_rows - x.shape[0]))


class Linear(nn.Module):
    """y = x W^T + b. Every matmul of the model goes through this class.

    Loaded with the weight as [out_features, in_features] in the model dtype;
    `prepare_for_inference` swaps in a kernel (and may drop `weight` to save memory).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.kernel: LinearKernel | None = None  # every row, or generated-kind rows
        self.prompt_kernel: LinearKernel | None = None  # prompt-kind rows, if they differ
        # Set for a GGUF file's projections at load (gguf_int4.use_files_int4_blocks),
        # read by an int4 plan: the file's own 4-bit blocks, read when packed (its weights
        # exactly, not requantized), or whether the file stores it wider than 4 bits (then
        # it keeps int8 blocks, as the output head does).
        self.file_int4: Callable[[], Int4Blocks] | None = None
        self.keeps_int8 = False

    def prepare_for_inference(
        self, plan: KernelPlan, invariance: RowInvariance, keep_weight: bool = False
    ) -> None:
        """Build this layer's kernel(s); drop the loaded weight unless a kernel reads it
        or `keep_weight` (a tied weight another module also uses)."""
        if plan.weight_dtype == INT4 and self.keeps_int8:
            plan = dataclasses.replace(plan, weight_dtype=torch.int8)
        self.kernel = self._build_kernel(plan, invariance)
        self.file_int4 = None  # packed, or not wanted: let the file's blocks go
        drops_weight = self.kernel.drops_weight
        if plan.prompt is not None:
            self.prompt_kernel = self._build_kernel(plan.prompt, invariance)
            drops_weight = drops_weight and self.prompt_kernel.drops_weight
        if not keep_weight and drops_weight:
            self.register_parameter("weight", None)  # the kernels hold their own copies

    def _build_kernel(self, plan: KernelPlan, invariance: RowInvariance) -> LinearKernel:
        kernel_type = _kernel_type(plan)
        if kernel_type is NativeLinearKernel:
            kernel = NativeLinearKernel(self.weight, self.bias, plan, self.file_int4)
        else:
            kernel = kernel_type(self.weight, self.bias, plan)
        if plan.batch_invariant and not kernel.rows_invariant:
            # each kernel pads to its own calibrated row count
            key = (kernel_type.__name__, plan.weight_dtype, self.in_features, self.out_features)
            kernel.min_rows = invariance.min_rows(
                key, kernel.compute, self.in_features, plan.device, plan.activation_dtype
            )
        return kernel

    def forward(
        self, x: torch.Tensor, kinds: RowKinds | None = None
    ) -> torch.Tensor:  # [N, in] -> [N, out]
        """kinds: which rows are prompt tokens; None (or a layer without a prompt kernel)
        runs every row through `kernel`."""
        if self.kernel is None:
            return F.linear(x, self.weight, self.bias)
        if self.prompt_kernel is None or kinds is None or kinds.uniform == GENERATED:
            return self.kernel(x)
        if kinds.uniform == PROMPT:
            return self.prompt_kernel(x)
        # Mixed rows: each kind through its own kernel, results back in row order.
        prompt_out = self.prompt_kernel(x.index_select(0, kinds.prompt_rows))  # [P, out]
        generated_out = self.kernel(x.index_select(0, kinds.generated_rows))  # [G, out]
        out = prompt_out.new_empty(x.shape[0], prompt_out.shape[1])  # [N, out]
        out.index_copy_(0, kinds.prompt_rows, prompt_out)
        return out.index_copy_(0, kinds.generated_rows, generated_out)


class LinearKernel:
    """One way to compute y = x W^T + b, with the weight in the layout it wants."""

    drops_weight = True  # holds a re-laid-out copy, so Linear may free the original
    rows_invariant = False  # a row's bits never depend on the row count (no calibration)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: KernelPlan) -> None:
        self.out_dtype = plan.activation_dtype
        self.matmul_dtype = plan.weight_dtype  # what the multiply-adds run in
        self.min_rows = 1

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        num_rows = x.shape[0]
        if num_rows >= self.min_rows:
            return self.compute(x)
        return self.compute(pad_rows(x, self.min_rows))[:num_rows]


class TorchLinearKernel(LinearKernel):
    """F.linear on the weight as loaded, cast to the weight dtype (fp16 gemv on CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: KernelPlan) -> None:
        super().__init__(weight, bias, plan)
        self.drops_weight = plan.weight_dtype != weight.dtype
        self.weight = weight.detach().to(plan.weight_dtype)
        self.bias = None if bias is None else bias.detach().to(plan.weight_dtype)
        self.casts = plan.weight_dtype != plan.activation_dtype

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if not self.casts:  # dispatching even a no-op .to() costs microseconds per layer
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(self.out_dtype)


class OneDnnLinearKernel(LinearKernel):
    """oneDNN matmul against a weight packed once into its blocked layout (CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: KernelPlan) -> None:
        super().__init__(weight, bias, plan)
        self.compute_dtype = plan.weight_dtype
        source = weight.detach().to(self.compute_dtype).contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(source, None)
        self.bias = None if bias is None else bias.detach().to(self.compute_dtype)
        self._linear = torch.ops.mkldnn._linear_pointwise.default  # skip overload resolution

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        if self.compute_dtype == self.out_dtype:
            return self._linear(x, self.packed, self.bias, "none", [], "")
        y = self._linear(x.to(self.compute_dtype), self.packed, self.bias, "none", [], "")
        return y.to(self.out_dtype)


class NativeLinearKernel(LinearKernel):
    """lamina's matmul (app/native) against a weight packed into 64-column panels, stored
    in fp32, fp16, bf16, or int8 or 4-bit blocks (the plan's weight dtype); activations and
    sums stay fp32 (with bf16 panels each input row is rounded to bf16 inside the kernel;
    with int8 and 4-bit blocks each row is quantized to int8 per block of 32 inside the
    kernel, each block's dot product summed exactly in int32: app/native/int8.h).
    A layer whose inputs are not whole blocks (a multiple of 32) keeps fp32 panels.
    4-bit panels are made from `file_int4`'s blocks when given (a GGUF file's own), not by
    quantizing the weight."""

    rows_invariant = True  # each element sums its K products in order: same bits for any M

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        plan: KernelPlan,
        file_int4: Callable[[], Int4Blocks] | None = None,
    ) -> None:
        super().__init__(weight, bias, plan)
        self.native = plan.native
        self.out_features = weight.shape[0]
        dtype = plan.weight_dtype
        if dtype in BLOCK_BYTES and not fits_blocks(weight.shape[1]):
            dtype = torch.float32
        self.matmul_dtype = dtype
        # [N/64, K, 64], on huge pages: a single stream reads every panel for every token
        if dtype == INT4 and file_int4 is not None:
            self.panels = pack_int4(_blocks_of(weight, file_int4), plan.arena.empty)
        else:
            self.panels = self.native.pack_weight(
                weight.detach().float(), plan.arena.empty, dtype=dtype
            )
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.native.matmul(x, self.panels, self.bias, self.out_features)


def _blocks_of(weight: torch.Tensor, file_int4: Callable[[], Int4Blocks]) -> Int4Blocks:
    blocks = file_int4()
    if blocks.q.shape != weight.shape:
        raise ValueError(f"the file's 4-bit blocks are {tuple(blocks.q.shape)}, the weight "
                         f"{tuple(weight.shape)}")  # fmt: skip
    return blocks


def _kernel_type(plan: KernelPlan) -> type[LinearKernel]:
    if plan.uses_native_matmul:
        return NativeLinearKernel
    return OneDnnLinearKernel if plan.use_onednn else TorchLinearKernel


def _all_equal(rows: list[torch.Tensor]) -> bool:
    return all(torch.equal(rows[0], row) for row in rows[1:])
