"""Fixtures for parity with transformers on the default model.

LAMINA_TEST_DEVICE=cuda runs them on the GPU in bf16 (looser tolerance); default CPU fp32.
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


@pytest.fixture(scope="session")
def device_case() -> DeviceCase:
    name = os.environ.get("LAMINA_TEST_DEVICE", "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("LAMINA_TEST_DEVICE=cuda but no CUDA GPU is visible")
        # bf16 on both sides, different kernels: differences of a few bf16 ulps of logits
        # of magnitude ~20 accumulate over 30 layers.
        return DeviceCase(torch.device("cuda"), torch.bfloat16, logits_atol=0.5)
    return DeviceCase(torch.device("cpu"), torch.float32, logits_atol=1e-3)


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
