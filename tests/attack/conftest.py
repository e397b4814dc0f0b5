"""Fixtures of the attack suite: real `lamina serve` processes on the tiny random LLaMA
with small connection limits, so each probe is quick and uses few descriptors.

- `guarded_server`: one server for the suite, LIMITS below (cap 50 connections, head
  1 s, body 2 s, keep-alive idle 2 s).
- `capped_server`: a server with a small cap and long timeouts, so held connections stay
  open while the cap is probed.
- `admission_server`: small admission bounds and a tiny KV cache, ADMISSION_LIMITS
  below, with two API keys (two clients).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

# Small admission bounds (issue 16, D2): 4 running sequences, 4 queued requests, 16
# queued sequences (20 admitted), a KV cache of 65 blocks (1040 tokens) as the token
# budget, and two API keys: two clients for the fair share.
ADMISSION_KEYS = ("key-a", "key-b")
ADMISSION_LIMITS = {
    "LAMINA_MAX_NUM_SEQS": "4",
    "LAMINA_MAX_QUEUED": "4",
    "LAMINA_KV_CACHE_GB": "0.0005",
    "LAMINA_API_KEYS": ",".join(ADMISSION_KEYS),
}


@pytest.fixture(scope="session")
def attack_servers(tiny_model_path: Path) -> Iterator[dict[str, ServerProcess]]:
    """Both servers, started side by side (their start-up is most of the suite's time)."""
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    base = {**TINY_ENV, "LAMINA_MODEL": str(tiny_model_path)}
    servers = {
        "guarded": ServerProcess(extra_env={**base, **LIMITS}),
        "capped": ServerProcess(extra_env={**base, **CAP_LIMITS}),
        "admission": ServerProcess(extra_env={**base, **ADMISSION_LIMITS}),
    }
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            for started in [pool.submit(s.start, 180) for s in servers.values()]:
                started.result()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def guarded_server(attack_servers: dict[str, ServerProcess]) -> ServerProcess:
    return attack_servers["guarded"]


@pytest.fixture(scope="session")
def capped_server(attack_servers: dict[str, ServerProcess]) -> ServerProcess:
    return attack_servers["capped"]


@pytest.fixture(scope="session")
def admission_server(attack_servers: dict[str, ServerProcess]) -> ServerProcess:
    return attack_servers["admission"]
