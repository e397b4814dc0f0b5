"""Fixtures of the attack suite: real `lamina serve` processes on the tiny random LLaMA
with small connection limits, so each probe is quick and uses few descriptors.

- `guarded_server`: one server for the suite, LIMITS below (cap 50 connections, head
  1 s, body 2 s, keep-alive idle 2 s).
- `capped_server`: a server with a small cap and long timeouts, so held connections stay
  open while the cap is probed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_process import ServerProcess, engine_available

# One torch thread: the other core stays free for the attacking clients.
TINY_ENV = {"LAMINA_DEVICE": "cpu", "LAMINA_NUM_THREADS": "1", "LAMINA_KV_CACHE_GB": "0.02"}
LIMITS = {
    "LAMINA_MAX_CONNECTIONS": "50",
    "LAMINA_HEADER_TIMEOUT_S": "1",
    "LAMINA_BODY_TIMEOUT_S": "2",
    "LAMINA_IDLE_TIMEOUT_S": "2",
}
CAP = 12
CAP_LIMITS = {
    "LAMINA_MAX_CONNECTIONS": str(CAP),
    "LAMINA_HEADER_TIMEOUT_S": "60",
    "LAMINA_IDLE_TIMEOUT_S": "60",
}


def _server(model_path: Path, limits: dict[str, str]) -> Iterator[ServerProcess]:
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    env = {**TINY_ENV, "LAMINA_MODEL": str(model_path), **limits}
    server = ServerProcess(extra_env=env).start(120)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def guarded_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    yield from _server(tiny_model_path, LIMITS)


@pytest.fixture(scope="session")
def capped_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    yield from _server(tiny_model_path, CAP_LIMITS)
