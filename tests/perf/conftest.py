"""Fixtures for the performance-related tests: a runner over the default model."""

from __future__ import annotations

import pytest

from app.config import load_settings
from app.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def perf_tokenizer(default_model_path) -> Tokenizer:
    return Tokenizer(default_model_path)


def default_settings(model_path, **overrides):
    """CPU fp32 settings as served by default, with a small cache for tests."""
    fields = dict(model=model_path, kv_cache_gb=0.25, device="cpu", dtype="float32")
    return load_settings(environ={}, **{**fields, **overrides})
