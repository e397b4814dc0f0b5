"""Fixtures of the browser tests: Debian's chromium driven by Playwright, one real
`lamina serve` with an API key, and nginx serving it under a path prefix.

Playwright drives the system browser (`executable_path`): `playwright install` would
download a browser of its own, which these machines cannot. Without chromium (Debian's
package, installed by `make system-deps` as root) or nginx the tests skip, saying why.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.bench.spawn import wait_until_answering
from tests.server_process import REPO_ROOT, SERVER_POOL, engine_available, free_port, takes_servers

API_KEY = "ui-test-key"
# Screenshots land here (git-ignored) for a person to look at after a run.
ARTIFACTS = REPO_ROOT / "artifacts" / "ui"
VENDOR = Path(__file__).parent / "vendor"


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Lamina:
    url: str  # the server itself
    prefixed_url: str  # the same server through nginx, under /lamina/

    def status(self) -> dict:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.get(self.url + "/status", headers=headers, timeout=10).json()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip: playwright (test extras)")
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium: `make system-deps` installs Debian's package (as root)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        yield launched
        launched.close()


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def _planned_lamina(request: pytest.FixtureRequest, item: pytest.Item) -> list[dict[str, str]]:
    if not engine_available() or find_nginx() is None:
        return []
    return [
        {
            "LAMINA_MODEL": str(request.getfixturevalue("default_model_path")),
            "LAMINA_API_KEYS": API_KEY,
        }
    ]


@pytest.fixture(scope="module")
@takes_servers(_planned_lamina)
def lamina(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lamina]:
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed: `make system-deps` (apt-get install nginx-light)")
    env = {"LAMINA_MODEL": str(default_model_path), "LAMINA_API_KEYS": API_KEY}
    with SERVER_POOL.start(env) as server:
        workdir = tmp_path_factory.mktemp("nginx-prefix")
        port = free_port()
        config = write_prefix_config(workdir, port, server.port)
        proxy = subprocess.Popen(
            [nginx, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            prefixed = f"http://127.0.0.1:{port}/lamina"
            wait_until_answering(prefixed + "/ready", proxy, "nginx", 20.0)
            yield Lamina(server.url, prefixed)
        finally:
            proxy.send_signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proxy.wait(10)
            if proxy.poll() is None:
                proxy.kill()


def write_prefix_config(workdir: Path, listen_port: int, upstream_port: int) -> Path:
    """The smallest nginx that serves lamina under /lamina/, streaming unbuffered, with
    every file it writes in `workdir`."""
    temp = "".join(
        f"    {name}_temp_path {workdir}/{name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = f"user {getpass.getuser()} {grp.getgrgid(os.getegid()).gr_name};\n"
    text = (
        (user if os.geteuid() == 0 else "")
        + f"pid {workdir}/nginx.pid;\ndaemon off;\nevents {{}}\nhttp {{\n{temp}"
        + f"    access_log {workdir}/access.log;\n"
        + f"    server {{\n        listen 127.0.0.1:{listen_port};\n"
        + "        location /lamina/ {\n"
        + f"            proxy_pass http://127.0.0.1:{upstream_port}/;\n"
        + "            proxy_http_version 1.1;\n"
        + "            proxy_buffering off;\n"
        + "        }\n    }\n}\n"
    )
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def axe_source() -> str:
    return (VENDOR / "axe.min.js").read_text()
