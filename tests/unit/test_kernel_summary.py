"""GET /status's `kernels` (ModelRunner.kernel_summary): the linear layers' storage in
words, the output head's added where it differs (int4 keeps its head in int8)."""

import pytest

from app.config import Settings
from app.model.runner import ModelRunner


@pytest.mark.parametrize(
    ("weight_dtype", "matmul"),
    [("float32", "float32"), ("int8", "int8"), ("int4", "int4; head int8")],
)
def test_the_summary_names_the_layers_storage_and_the_heads(tiny_model_path, weight_dtype, matmul):
    settings = Settings(
        model=tiny_model_path, device="cpu", kv_cache_gb=0.002, weight_dtype=weight_dtype
    )
    summary = ModelRunner.from_settings(settings).kernel_summary()
    assert summary["matmul"] == matmul
    assert summary["decoder_layers"] == "fused native stack"
