"""A loopback fleet for `lamina bench fleet`: lamina replicas, and in front of them
nginx (deploy/nginx/nginx.conf, least connections) or SGLang's model gateway
(`sglang-router`, cache-aware), each started and stopped here."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.bench.spawn import free_port, wait_until_answering, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]

# The router's flags (docs/router-comparison.md): cache-aware routing; /ready as the
# health check, one check a second, one failure takes a replica out; retries back off
# 0.4, 0.8, 1.6, 3.2 s, outlasting that. tests/system/test_router_fleet.py runs the real
# router with them; docker-compose.fleet.yml and deploy/k8s/router are held to them.
ROUTER_FLAGS = [
    "--policy", "cache_aware",
    "--health-check-endpoint", "/ready",
    "--health-check-interval-secs", "1",
    "--health-failure-threshold", "1",
    "--worker-startup-check-interval", "1",
    "--retry-max-retries", "5",
    "--retry-initial-backoff-ms", "400",
    "--retry-backoff-multiplier", "2",
]  # fmt: skip


@dataclass
class Replica:
    url: str
    process: subprocess.Popen

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextlib.contextmanager
def replicas(count: int, env: dict[str, str]) -> Iterator[list[Replica]]:
    """`count` lamina processes started side by side; yields once all are ready."""
    started = []
    try:
        for _ in range(count):
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT,
                env={**os.environ, "LAMINA_LOG_LEVEL": "error", **env},
            )
            started.append(Replica(f"http://127.0.0.1:{port}", process))
        for replica in started:
            wait_until_serving(replica.url, replica.process)
        yield started
    finally:
        for replica in started:
            _stop(replica.process)


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@contextlib.contextmanager
def nginx(members: list[Replica]) -> Iterator[str]:
    """nginx with deploy/nginx/nginx.conf rendered for the replicas; yields its URL."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    spec = importlib.util.spec_from_file_location("loopback", ROOT / "deploy/nginx/loopback.py")
    loopback = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loopback)
    workdir = Path(tempfile.mkdtemp(prefix="lamina-bench-nginx-"))
    port = free_port()
    config = loopback.write_loopback_config(workdir, port, [m.address for m in members])
    command = [binary, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(url + "/nginx-health", process, "nginx")
        yield url
    finally:
        _stop(process, signal.SIGQUIT, 30)


@contextlib.contextmanager
def router(members: list[Replica]) -> Iterator[str]:
    """sglang-router (cache_aware, ROUTER_FLAGS) in front of the replicas; yields its URL
    once it lists every replica healthy."""
    if importlib.util.find_spec("sglang_router") is None:
        raise RuntimeError("sglang-router is not installed (pip install sglang-router)")
    port, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--log-level", "warn", "--worker-urls", *[m.url for m in members], *ROUTER_FLAGS,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        wanted = {m.url for m in members}
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the router exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                workers = httpx.get(url + "/workers", timeout=2).json()["workers"]
                if {w["url"] for w in workers if w["is_healthy"]} >= wanted:
                    break
            time.sleep(0.25)
        else:
            raise TimeoutError("the router did not list every replica healthy")
        yield url
    finally:
        _stop(process, signal.SIGTERM, 30)


def prefix_cache_counts(url: str) -> tuple[float, float]:
    """(prompt tokens looked up, found) in one replica's prefix cache, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text

    def total(name: str) -> float:
        found = re.findall(rf"^lamina:{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        return sum(float(value) for value in found)

    return total("prefix_cache_queries"), total("prefix_cache_hits")
