"""Start a server process for a benchmark on a free loopback port; stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

COMMANDS = {
    "lamina": [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port"],
    "transformers": [sys.executable, "-m", "app.bench.baseline_server", "--port"],
}


class ServerExited(RuntimeError):
    """The process exited before it answered (a crash at load, a bad flag)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(
    url: str, process: subprocess.Popen, what: str, timeout_s: float = 60.0
) -> None:
    """Poll GET `url` until it answers 200 (a replica's /ready, nginx's health page),
    failing at once if `process` (what serves it) exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerExited(f"{what} exited with {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s ({url})")


def wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Poll GET /v1/models until it answers 200 (lamina answers only once ready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"server at {url} not ready after {timeout_s:.0f}s")


@contextlib.contextmanager
def spawned_server(kind: str, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "LAMINA_LOG_LEVEL": "warning", **(extra_env or {})}
    process = subprocess.Popen([*COMMANDS[kind], str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process)
        yield url
    finally:
        stop_process(process, timeout_s=60)


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (a server drains and exits), then SIGKILL if it is still there after
    `timeout_s`."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
