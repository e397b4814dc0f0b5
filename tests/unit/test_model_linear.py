"""Linear kernels: same results as F.linear, row invariance, weight precision, fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.model.linear import (
    ALL_GENERATED,
    ALL_PROMPT,
    KernelPlan,
    Linear,
    NativeLinearKernel,
    OneDnnLinearKernel,
    RowInvariance,
    RowKinds,
    TorchLinearKernel,
    calibrate_min_rows,
    cpu_kernel_plan,
    kernel_plan,
    onednn_available,
    pad_rows,
)

CPU = torch.device("cpu")


def make_linear(in_features=96, out_features=80, bias=True, seed=0) -> Linear:
    generator = torch.Generator().manual_seed(seed)
    layer = Linear(in_features, out_features, bias)
    layer.weight.data = torch.randn(out_features, in_features, generator=generator)
    if bias:
        layer.bias.data = torch.randn(out_features, generator=generator)
    return layer


def reference(layer_weight, layer_bias, x):
    return F.linear(x.double(), layer_weight.double(), layer_bias.double()).float()


@pytest.mark.parametrize(
    "weight_dtype, atol, allow_native",
    [
        (torch.float32, 1e-4, True),
        (torch.float32, 1e-4, False),
        (torch.float16, 5e-2, True),
        (torch.bfloat16, 3e-1, True),
    ],
)
def test_kernels_compute_the_linear_map(weight_dtype, atol, allow_native):
    layer = make_linear()
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    plan = cpu_kernel_plan(torch.float32, weight_dtype, True, allow_native)
    layer.prepare_for_inference(plan, RowInvariance())
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (7, 80)
    torch.testing.assert_close(out, reference(weight, bias, x), atol=atol, rtol=0.02)
    assert layer(x[:1]).shape == (1, 80)  # a single row works (padded if needed)


def test_fp32_on_cpu_uses_packed_onednn_and_drops_the_loaded_weight():
    if not onednn_available(torch.float32):
        pytest.skip("this torch build has no oneDNN linear")
    layer = make_linear()
    plan = cpu_kernel_plan(torch.float32, None, True, allow_native=False)
    layer.prepare_for_inference(plan, RowInvariance())
    assert isinstance(layer.kernel, OneDnnLinearKernel)
    assert layer.weight is None  # the packed copy is the only one left


def test_fp32_on_cpu_uses_the_native_kernel_without_padding(native):
    layer = make_linear()
    plan = cpu_kernel_plan(torch.float32, None, True)
    assert plan.native is native and plan.uses_native_matmul and not plan.use_onednn
    layer.prepare_for_inference(plan, RowInvariance())
    assert isinstance(layer.kernel, NativeLinearKernel)
    assert layer.kernel.min_rows == 1  # invariant by construction: nothing to calibrate
    assert layer.weight is None


def test_without_native_kernels_fp32_falls_back_to_torch(monkeypatch):
    import app.model.linear as linear

    monkeypatch.setattr(linear, "native_kernels", lambda: None)  # as with no C compiler
    plan = cpu_kernel_plan(torch.float32, None, True)
    assert plan.native is None and plan.use_onednn == onednn_available(torch.float32)


def test_fp16_weights_without_native_kernels_use_torch_in_half_precision():
    layer = make_linear()
    plan = cpu_kernel_plan(torch.float32, torch.float16, True, allow_native=False)
    layer.prepare_for_inference(plan, RowInvariance())
    assert isinstance(layer.kernel, TorchLinearKernel)
    assert layer.kernel.weight.dtype == torch.float16 and layer.kernel.matmul_dtype == torch.float16
    assert layer.weight is None


def test_fp16_weights_with_native_kernels_read_fp16_panels_and_sum_in_fp32(native):
    layer = make_linear()
    weight = layer.weight.detach().clone()
    layer.prepare_for_inference(
        cpu_kernel_plan(torch.float32, torch.float16, True), RowInvariance()
    )
    assert isinstance(layer.kernel, NativeLinearKernel)
    assert layer.kernel.panels.dtype == torch.float16 and layer.kernel.min_rows == 1
    assert isinstance(layer.prompt_kernel, NativeLinearKernel)  # prompt rows: fp32 panels
    assert layer.prompt_kernel.panels.dtype == torch.float32
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(5))
    # fp32 activations times the fp16-rounded weights, summed in fp32 (no fp16 rounding
    # of the activations or the result, unlike torch's fp16 F.linear)
    expected = (x.double() @ weight.half().double().T + layer.kernel.bias.double()).float()
    torch.testing.assert_close(layer(x, ALL_GENERATED), expected, atol=1e-4, rtol=1e-5)


def test_bf16_weights_with_native_kernels_keep_one_bf16_copy_for_every_row(native):
    """One bf16 panel copy serves prompt and generated rows alike (no fp32 copy beside
    it); inputs are rounded to bf16, the products summed in fp32; nothing to calibrate."""
    layer = make_linear()
    weight = layer.weight.detach().clone()
    plan = cpu_kernel_plan(torch.float32, torch.bfloat16, True)
    assert plan.uses_native_matmul and not plan.use_onednn and plan.prompt is None
    layer.prepare_for_inference(plan, RowInvariance())
    assert isinstance(layer.kernel, NativeLinearKernel) and layer.prompt_kernel is None
    assert layer.kernel.panels.dtype == torch.bfloat16 and layer.kernel.min_rows == 1
    assert layer.weight is None
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(5))
    expected = x.bfloat16().double() @ weight.bfloat16().double().T
    expected = (expected + layer.kernel.bias.double()).float()
    for kinds in (None, ALL_PROMPT, ALL_GENERATED):
        torch.testing.assert_close(layer(x, kinds), expected, atol=1e-5, rtol=1e-5)


def test_bf16_weights_on_torch_kernels_warn_that_rows_may_vary(caplog):
    """Without native kernels bf16 runs on oneDNN, which picks kernels by row count on
    AMX CPUs: the log says invariance is not guaranteed instead of falling back quietly."""
    with caplog.at_level("WARNING", logger="app.model.linear"):
        plan = cpu_kernel_plan(torch.float32, torch.bfloat16, True, allow_native=False)
    assert not plan.uses_native_matmul
    assert "batch invariance is only guaranteed by the native kernels" in caplog.text
    assert "turned off" in caplog.text


def test_only_fp16_weights_get_a_prompt_kernel():
    assert cpu_kernel_plan(torch.float32, None, True).prompt is None
    assert cpu_kernel_plan(torch.float32, torch.bfloat16, True).prompt is None
    plan = cpu_kernel_plan(torch.float32, torch.float16, True)
    assert plan.prompt == cpu_kernel_plan(torch.float32, None, True)  # the default fp32 plan
    layer = make_linear()
    layer.prepare_for_inference(cpu_kernel_plan(torch.float32, None, True), RowInvariance())
    assert layer.prompt_kernel is None


def fp16_and_fp32_layers(in_features=576, out_features=320):
    """The same weights prepared with fp16 weights (two kernels) and with fp32 ones."""
    mixed, fp32 = make_linear(in_features, out_features), make_linear(in_features, out_features)
    mixed.prepare_for_inference(
        cpu_kernel_plan(torch.float32, torch.float16, True), RowInvariance()
    )
    fp32.prepare_for_inference(cpu_kernel_plan(torch.float32, None, True), RowInvariance())
    return mixed, fp32


def test_prompt_rows_take_the_fp32_kernel_and_generated_rows_the_fp16_one():
    mixed, fp32 = fp16_and_fp32_layers()
    assert mixed.kernel.matmul_dtype == torch.float16
    assert mixed.prompt_kernel.matmul_dtype == torch.float32
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mixed(x, ALL_PROMPT), fp32(x))  # bit for bit the fp32 layer
    assert torch.equal(mixed(x, ALL_GENERATED), mixed(x))  # no kinds: the fp16 kernel
    assert not torch.equal(mixed(x, ALL_GENERATED), fp32(x))


def test_mixed_rows_are_split_by_kind_and_put_back_in_order():
    mixed, _ = fp16_and_fp32_layers()
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(4))
    is_prompt = [True, False, False, True, True, False, True, True, True, False, True]
    kinds = RowKinds.from_flags(is_prompt, CPU)
    assert kinds.uniform is None
    out = mixed(x, kinds)  # [11, 320]
    for row, prompt in enumerate(is_prompt):
        alone = mixed(x[row : row + 1], ALL_PROMPT if prompt else ALL_GENERATED)
        assert torch.equal(out[row : row + 1], alone), row  # batch mates change nothing


def test_row_kinds_from_flags():
    assert RowKinds.from_flags([True, True], CPU) is ALL_PROMPT
    assert RowKinds.from_flags([False], CPU) is ALL_GENERATED
    kinds = RowKinds.from_flags([False, True, False], CPU)
    assert kinds.prompt_rows.tolist() == [1] and kinds.generated_rows.tolist() == [0, 2]


def test_reference_plan_keeps_the_weight():
    assert kernel_plan(CPU, torch.float32, None, True, kernels="reference") is None
    with pytest.raises(ValueError, match="kernels"):
        kernel_plan(CPU, torch.float32, None, True, kernels="fast")
    layer = make_linear()
    plan = KernelPlan(CPU, torch.float32, torch.float32, False, batch_invariant=False)
    layer.prepare_for_inference(plan, RowInvariance())
    assert layer.weight is not None and layer.kernel.min_rows == 1


@pytest.mark.parametrize(
    "weight_dtype, allow_native",
    [
        (torch.float32, True),
        (torch.float32, False),
        (torch.float16, True),
        (torch.bfloat16, True),
    ],
)
def test_rows_have_the_same_bits_whatever_the_row_count(weight_dtype, allow_native):
    """The property batch invariance rests on: row r of x @ W^T never depends on M."""
    layer = make_linear(576, 320, bias=False)
    plan = cpu_kernel_plan(torch.float32, weight_dtype, True, allow_native)
    layer.prepare_for_inference(plan, RowInvariance())
    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([layer(x[i : i + 1]) for i in range(70)])
    for num_rows in (2, 3, 5, 16, 33, 70):
        assert torch.equal(layer(x[:num_rows]), alone[:num_rows]), num_rows


def test_calibration_finds_where_a_kernel_stops_changing():
    """A fake kernel whose first row changes below 4 rows (as MKL's gemv switch does)."""

    def row_op(x):
        out = x * 2.0
        if x.shape[0] < 4:
            out = out + 1e-3
        return out

    assert calibrate_min_rows(row_op, 8, CPU) == 4
    assert calibrate_min_rows(lambda x: x * 2.0, 8, CPU) == 1


def test_pad_rows():
    x = torch.ones(2, 3)
    assert pad_rows(x, 2) is x
    padded = pad_rows(x, 4)
    assert padded.shape == (4, 3) and padded[2:].abs().sum() == 0 and torch.equal(padded[:2], x)
