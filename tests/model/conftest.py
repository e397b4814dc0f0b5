"""Fixtures for parity with transformers on the default model.

LAMINA_TEST_DEVICE=cuda runs them on the GPU, in bf16 unless LAMINA_TEST_DTYPE=float32.
Both models run on the same device in the same dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class DeviceCase:
    device: torch.device
    dtype: torch.dtype
    logits_atol: float  # max |ours - transformers| over all logits
    # Greedy tokens that must agree with transformers: all of them in fp32; in half
    # precision a near-tie may flip legitimately after a while.
    min_equal_greedy_tokens: int | None


@pytest.fixture(scope="session")
def device_case() -> DeviceCase:
    name = os.environ.get("LAMINA_TEST_DEVICE", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("LAMINA_TEST_DEVICE=cuda but no CUDA GPU is visible")
    default_dtype = "bfloat16" if name == "cuda" else "float32"
    dtype = getattr(torch, os.environ.get("LAMINA_TEST_DTYPE", default_dtype))
    if dtype == torch.float32:
        return DeviceCase(torch.device(name), dtype, 1e-3, None)
    # Calibrated on the CPU in bf16: prefill logits were identical to transformers',
    # chunked prefill differed by up to 0.8 (logits of magnitude ~30); bf16 vs fp32
    # differ by ~3.
    return DeviceCase(torch.device(name), dtype, 1.5, 8)


@pytest.fixture(scope="session")
def our_model(default_model_path, device_case):
    from app.model.loader import load_model

    return load_model(default_model_path, device_case.device, device_case.dtype, max_positions=2048)


@pytest.fixture(scope="session")
def hf_model(default_model_path, device_case):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(default_model_path, dtype=device_case.dtype)
    return model.to(device_case.device).eval()


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    from app.tokenizer import Tokenizer

    return Tokenizer(default_model_path)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    """A chat prompt and plain-text prompts of different lengths (some cross blocks)."""
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    texts = [
        "The quick brown fox",
        "In 1969, the first humans landed on the Moon. The mission was called Apollo 11, and"
        " the astronauts were",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
    ]
    return [chat] + [tokenizer.encode(text) for text in texts]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    """An empty cache of GGUF conversions for the test (app.model.gguf_folder's)."""
    from app.model import gguf_folder

    cache = tmp_path / "gguf-cache"
    monkeypatch.setattr(gguf_folder, "gguf_cache_dir", lambda: cache)
    return cache


@pytest.fixture(scope="module")
def module_gguf_cache(tmp_path_factory):
    """An empty cache of GGUF conversions shared by a test module's tests (for modules
    whose module-scoped models are converted once)."""
    from app.model import gguf_folder

    cache = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_folder, "gguf_cache_dir", lambda: cache)
        yield cache
