"""Run a real `lamina serve` process for system tests (reusable by every test folder).

    with ServerProcess(extra_env={"LAMINA_MAX_N": "2"}) as server:
        httpx.get(server.url + "/ready")

The process gets a free port, a small KV cache and no inherited LAMINA_* variables
(so a developer's shell cannot change test results); `extra_env` adds or overrides.
`start()` waits for GET /ready to answer 200 and fails with the log's tail if the
process dies first. `stop()` sends SIGTERM (then SIGKILL) and returns the exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

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
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = command or [sys.executable, "-m", "app", "serve"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
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
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
