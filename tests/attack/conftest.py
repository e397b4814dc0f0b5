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

from tests.server_process import SERVER_POOL, ServerProcess, engine_available, takes_servers

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


def attack_envs(tiny_model_path: Path) -> dict[str, dict[str, str]]:
    base = {**TINY_ENV, "LAMINA_MODEL": str(tiny_model_path)}
    return {
        "guarded": {**base, **LIMITS},
        "capped": {**base, **CAP_LIMITS},
        "admission": {**base, **ADMISSION_LIMITS},
    }


def _planned_attack_servers(
    request: pytest.FixtureRequest, item: pytest.Item
) -> list[dict[str, str]]:
    if not engine_available():
        return []
    return list(attack_envs(request.getfixturevalue("tiny_model_path")).values())


@pytest.fixture(scope="session")
@takes_servers(_planned_attack_servers)
def attack_servers(tiny_model_path: Path) -> Iterator[dict[str, ServerProcess]]:
    """The three servers, started side by side (or ahead of time by the server pool)."""
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    envs = attack_envs(tiny_model_path)
    servers: dict[str, ServerProcess] = {}
    try:
        with ThreadPoolExecutor(len(envs)) as pool:
            started = {name: pool.submit(SERVER_POOL.start, env, 180) for name, env in envs.items()}
            for name, future in started.items():
                servers[name] = future.result()
        yield servers
    finally:
        for future in started.values():  # every one that started, even if another failed
            if future.exception() is None:
                future.result().stop()


@pytest.fixture(scope="session")
def guarded_server(attack_servers: dict[str, ServerProcess]) -> ServerProcess:
    return attack_servers["guarded"]


@pytest.fixture(scope="session")
def capped_server(attack_servers: dict[str, ServerProcess]) -> ServerProcess:
    return attack_servers["capped"]


@pytest.fixture(scope="session")
def admission_server(attack_servers: dict[str, ServerProcess]) -> ServerProcess:
    return attack_servers["admission"]
