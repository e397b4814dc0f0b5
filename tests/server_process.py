"""Run a real `lamina serve` process for system tests (reusable by every test folder).

    with ServerProcess(extra_env={"LAMINA_MAX_N": "2"}) as server:
        httpx.get(server.url + "/ready")

The process gets a free port, a small KV cache and no inherited LAMINA_* variables
(so a developer's shell cannot change test results); `extra_env` adds or overrides.
`start()` waits for GET /ready to answer 200 and fails with the log's tail if the
process dies first. `stop()` sends SIGTERM (then SIGKILL) and returns the exit code.

`SERVER_POOL.start(env)` gives the same server, started ahead of time when the fixture
that asks for it is marked `@takes_servers(...)` (tests/conftest.py plans them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

F = TypeVar("F", bound=Callable[..., Any])
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEST_ENV = {
    "LAMINA_HOST": "127.0.0.1",
    "LAMINA_KV_CACHE_GB": "0.25",
    "LAMINA_LOG_FORMAT": "text",
    "LAMINA_LOG_LEVEL": "info",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_available() -> bool:
    """True once the real engine and model runner are in the tree."""
    return (REPO_ROOT / "app/engine/engine.py").is_file() and (
        REPO_ROOT / "app/model/runner.py"
    ).is_file()


class ServerProcess:
    def __init__(
        self,
        extra_env: dict[str, str] | None = None,
        command: list[str] | None = None,
        port: int | None = None,
        base_env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = command or [sys.executable, "-m", "app", "serve"]
        base = os.environ if base_env is None else base_env  # the pool's: the session's own
        env = {k: v for k, v in base.items() if not k.startswith("LAMINA_")}
        env.update(DEFAULT_TEST_ENV)
        env["LAMINA_PORT"] = str(self.port)
        env.update(extra_env or {})
        self.env = env
        self.log_path = Path(tempfile.mkstemp(prefix="lamina-server-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 300.0) -> ServerProcess:
        self.spawn()
        self.wait_ready(ready_timeout_s)
        return self

    def spawn(self) -> ServerProcess:
        """Start the process without waiting (several servers then load side by side)."""
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, num_lines: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def __enter__(self) -> ServerProcess:
        """Starts the server, or waits for one spawned already (SERVER_POOL) to be ready."""
        if self.process is None:
            return self.start()
        self.wait_ready(300.0)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


EnvBuilder = Callable[[Any, Any], list[dict[str, str]]]
# (module, fixture name) -> what servers that fixture will take from the pool, in order.
_PLANNERS: dict[tuple[str, str], EnvBuilder] = {}


def takes_servers(env_builder: EnvBuilder) -> Callable[[F], F]:
    """Marks a server fixture (under its @pytest.fixture) whose servers the session starts
    ahead of time: `env_builder(request, item)` (the session's request, a test using the
    fixture: once per test for a function-scoped one) returns the `extra_env` of each
    server it will take with `SERVER_POOL.start(env)`, or [] where it would skip."""

    def mark(fixture_function: F) -> F:
        _PLANNERS[(fixture_function.__module__, fixture_function.__name__)] = env_builder
        return fixture_function

    return mark


def planner_of(fixture_function: Callable[..., Any]) -> EnvBuilder | None:
    key = (getattr(fixture_function, "__module__", ""), getattr(fixture_function, "__name__", ""))
    return _PLANNERS.get(key)


class ServerPool:
    """Servers the session will need, started ahead of the tests that take them.

    Why: a server's start-up (imports, weights, warm-up) is seconds of one core, and a
    test waiting for it leaves the other core idle; `make test` waits for dozens. The
    pool starts the planned servers in the tests' order, one at a time, in a background
    thread, so each loads while earlier tests run. A server taken from the pool is
    exactly the one the fixture would have started (same environment, never used
    before); one that was not planned, or not yet spawned, is started on the spot. At
    most `max_ahead` wait to be taken (an idle server holds 0.3 to 1 GB).
    """

    def __init__(self, max_ahead: int = 3) -> None:
        self._lock = threading.Lock()
        self._taken = threading.Condition(self._lock)
        self._max_ahead = max_ahead  # servers spawned and not yet taken, at most
        self._queue: list[dict[str, str]] = []
        self._spawned: dict[tuple[tuple[str, str], ...], list[ServerProcess]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        # The environment at planning, before any test: a server spawned in the background
        # while a test has monkeypatched os.environ must not inherit the test's variables.
        self._base_env: dict[str, str] | None = None

    @staticmethod
    def _key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(env.items()))

    def plan(self, envs: list[dict[str, str]]) -> None:
        """Start these servers in the background, in this order."""
        with self._lock:
            if self._base_env is None:
                self._base_env = dict(os.environ)
            self._queue.extend(envs)
            if self._queue and self._thread is None:
                self._thread = threading.Thread(target=self._spawn_planned, daemon=True)
                self._thread.start()

    def _next_planned(self) -> ServerProcess | None:
        with self._lock:
            while not self._closed and self._num_untaken() >= self._max_ahead:
                self._taken.wait()
            if self._closed or not self._queue:
                self._thread = None
                return None
            env = self._queue.pop(0)
            server = ServerProcess(extra_env=env, base_env=self._base_env).spawn()
            self._spawned.setdefault(self._key(env), []).append(server)
            return server

    def _spawn_planned(self) -> None:
        while (server := self._next_planned()) is not None:
            with contextlib.suppress(Exception):  # its taker sees the failure
                server.wait_ready(300.0)

    def start(self, env: dict[str, str], ready_timeout_s: float = 300.0) -> ServerProcess:
        """A ready server with `extra_env=env`: a planned one, or one started now."""
        (server,) = self.start_many([env], ready_timeout_s)
        return server

    def start_many(
        self, envs: list[dict[str, str]], ready_timeout_s: float = 300.0
    ) -> list[ServerProcess]:
        """Ready servers, one per environment: those not planned load side by side."""
        servers = [self.take(env) for env in envs]
        try:
            for server in servers:
                server.wait_ready(ready_timeout_s)
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return servers

    def _num_untaken(self) -> int:
        return sum(len(servers) for servers in self._spawned.values())

    def take(self, env: dict[str, str]) -> ServerProcess:
        """A spawned server with `extra_env=env`, maybe still loading (wait_ready)."""
        with self._lock:
            spawned = self._spawned.get(self._key(env))
            if spawned:
                self._taken.notify_all()
                return spawned.pop(0)
            if env in self._queue:
                self._queue.remove(env)  # not spawned yet: no use waiting for it
        return ServerProcess(extra_env=env).spawn()

    def close(self) -> None:
        """Stop every planned server no test took, and plan no more."""
        with self._lock:
            self._closed = True
            self._taken.notify_all()
            self._queue.clear()
            left = [server for servers in self._spawned.values() for server in servers]
            self._spawned.clear()
        for server in left:
            server.stop()


SERVER_POOL = ServerPool()
