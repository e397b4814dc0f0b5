"""A loopback fleet for system tests: lamina replicas behind SGLang's model gateway.

The gateway is the `sglang-router` wheel from PyPI (a Rust binary, run as
`python -m sglang_router.launch_router`), with the flags deploy/ uses: cache-aware
routing, readiness (`/ready`) as its health check, and retries spread over a few
seconds so that a request meeting a replica that has just gone away waits for the
health check to take it out instead of failing (docs/router-comparison.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.bench.fleet import ROUTER_FLAGS
from tests.server_process import REPO_ROOT, SERVER_POOL, ServerProcess, engine_available, free_port


def router_installed() -> bool:
    """Whether the sglang-router wheel is importable (Linux x86_64 and aarch64 only)."""
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        return False
    return True


def replica_env(model_path: Path, drain_timeout_s: int) -> dict[str, str]:
    """A small replica: the tiny model, one thread, a small KV cache."""
    return {
        "LAMINA_MODEL": str(model_path),
        "LAMINA_DEVICE": "cpu",
        "LAMINA_NUM_THREADS": "1",
        "LAMINA_KV_CACHE_GB": "0.25",
        "LAMINA_DRAIN_TIMEOUT_S": str(drain_timeout_s),
        "LAMINA_LOG_LEVEL": "info",
    }


def start_replicas(count: int, model_path: Path, drain_timeout_s: int = 60) -> list[ServerProcess]:
    """`count` lamina processes, loading side by side (or started ahead of time by the
    server pool, for a fixture marked with `planned_replicas`); returns once all are ready."""
    return SERVER_POOL.start_many([replica_env(model_path, drain_timeout_s)] * count, 240.0)


def planned_replicas(count: int, drain_timeout_s: int = 60, runs: Callable[[], bool] = bool):
    """A `takes_servers` planner for a fixture that calls start_replicas(count, ...);
    `runs()` says whether the fixture will run (it skips when a tool is missing)."""

    def plan(request, item) -> list[dict[str, str]]:
        if not engine_available() or not runs():
            return []
        model_path = request.getfixturevalue("tiny_model_path")
        return [replica_env(model_path, drain_timeout_s)] * count

    return plan


@dataclass
class Router:
    process: subprocess.Popen
    url: str
    metrics_url: str  # its Prometheus exporter (a port of its own)
    log_path: Path

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def workers(self) -> list[dict]:
        """The router's own view: GET /workers (url, model_id, is_healthy, ...)."""
        return httpx.get(self.url + "/workers", timeout=5.0).json()["workers"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_router(worker_urls: list[str], model_name: str, timeout_s: float = 60.0) -> Router:
    """The gateway in front of `worker_urls`; returns once it lists them all healthy
    under the model's own name (read from lamina's /server_info)."""
    port, metrics_port = free_port(), free_port()
    log_path = Path(tempfile.mkstemp(prefix="sglang-router-", suffix=".log")[1])
    command = [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--log-level", "warn",
        "--worker-urls", *worker_urls,
        *ROUTER_FLAGS,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    router = Router(
        process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log_path
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the router exited with {process.returncode}:\n{router.log_tail()}")
        try:
            workers = router.workers()
        except (httpx.HTTPError, ValueError, KeyError):
            workers = []
        ready = {w["url"] for w in workers if w["is_healthy"] and w["model_id"] == model_name}
        if ready >= set(worker_urls):
            return router
        time.sleep(0.25)
    router.stop()
    raise TimeoutError(f"the router did not list every worker healthy:\n{router.log_tail()}")


@dataclass
class Conversation:
    """A multi-turn chat whose long system prompt is its own (a salt in front)."""

    url: str
    model: str
    salt: str
    headers: dict[str, str] = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        rules = " ".join(f"Rule {i}: answer briefly about topic {i}." for i in range(25))
        self.messages.append({"role": "system", "content": f"Session {self.salt}. {rules}"})

    def say(self, text: str, max_tokens: int = 8) -> httpx.Response:
        """One turn: the reply is appended to the history when it is a 200."""
        self.messages.append({"role": "user", "content": text})
        response = httpx.post(
            self.url + "/v1/chat/completions",
            json=self.body(max_tokens),
            headers=self.headers,
            timeout=120,
        )
        if response.status_code == 200:
            reply = response.json()["choices"][0]["message"]["content"]
            self.messages.append({"role": "assistant", "content": reply})
        return response

    def body(self, max_tokens: int, stream: bool = False) -> dict:
        return {
            "model": self.model,
            "messages": self.messages,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": stream,
        }


class BackgroundStream(threading.Thread):
    """One streamed chat request in a thread: its events, whether it ended with
    `data: [DONE]`, and the exception that cut it, if any."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.status: int | None = None
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.first_event = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", self.url + "/v1/chat/completions", json=self.body, timeout=120
            ) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: ") :])
                        self.first_event.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.first_event.set()

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def finish_reason(self) -> str | None:
        """The choice's finish_reason, from the event that carries it (None: none did)."""
        for event in self.events:
            if event == "[DONE]":
                continue
            for choice in json.loads(event).get("choices", []):
                if choice.get("finish_reason"):
                    return choice["finish_reason"]
        return None
