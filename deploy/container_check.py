"""Build lamina's CPU image for real and check the running container (`make container-check`).

1. a Docker daemon: the running one, else `dockerd` started here (root, Debian's
   docker.io package), stopped again at the end;
2. the base image: --python-image, else `lamina-base:bookworm`, made once from Debian's
   archive with mmdebstrap (python3, python3-venv, ca-certificates) and `docker import`;
3. wheels/ in the build context: torch's CPU wheel and every dependency, downloaded with
   this machine's pip, and the build told to use no index (PIP_NO_INDEX=1);
4. `docker build` (BuildKit) of the default image (VARIANT=cpu, WEIGHTS=mounted);
5. the container, with the default model mounted read-only: Docker's HEALTHCHECK turns
   healthy (liveness: /health), then /ready answers 200 (the model is loaded and warm),
   a chat request answers "Paris", the server runs as uid 10001, and SIGTERM
   with a stream in flight lets the stream finish and the container exit 0.

Prints each step's seconds and writes them to bench_results/container_check.json.
Slow (a build from nothing takes minutes), so not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "lamina-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
MODEL_DIR = "smollm2-135m-instruct"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]
DRAIN_TIMEOUT_S = 180


def log(message: str) -> None:
    print(f"[container-check] {message}", flush=True)


def sh(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, text=True, capture_output=True, **kwargs)


def docker_with_buildkit(preferred: str | None) -> str:
    """A docker client that builds with BuildKit: one with the buildx plugin, or one
    older than 23 (BuildKit built in, DOCKER_BUILDKIT=1). A newer client without buildx
    would fall back to the legacy builder, which builds every stage (CUDA's too)."""
    candidates = [preferred] if preferred else []
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        candidates.append(str(Path(folder) / "docker"))
    for docker in dict.fromkeys(candidates):
        if not docker or not os.access(docker, os.X_OK):
            continue
        if sh(docker, "buildx", "version", check=False).returncode == 0:
            return docker
        version = sh(docker, "version", "--format", "{{.Client.Version}}", check=False).stdout
        if version and int(version.split(".")[0]) < 23:
            return docker
    sys.exit("no docker client that builds with BuildKit (install buildx or docker.io)")


class Daemon:
    """The Docker daemon: the one running, or dockerd started (and later stopped) here."""

    def __init__(self, docker: str, workdir: Path) -> None:
        self.docker, self.process = docker, None
        if sh(docker, "info", check=False).returncode == 0:
            return
        if shutil.which("dockerd") is None or os.geteuid() != 0:
            sys.exit("no Docker daemon; as root on Debian: apt-get install docker.io")
        log("starting dockerd")
        with (workdir / "dockerd.log").open("wb") as out:
            self.process = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while sh(docker, "info", check=False).returncode != 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                sys.exit(f"dockerd did not start: see {workdir / 'dockerd.log'}")
            time.sleep(1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        found = re.search(r"^URIs:\s*(\S+)", path.read_text(), re.MULTILINE)
        if found and "security" not in found.group(1):
            return found.group(1)
    sources = Path("/etc/apt/sources.list")
    if sources.is_file():
        found = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", sources.read_text(), re.MULTILINE)
        if found:
            return found.group(1)
    return "http://deb.debian.org/debian"


def ensure_base_image(docker: str) -> None:
    if sh(docker, "image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    if shutil.which("mmdebstrap") is None:
        sys.exit("mmdebstrap is missing: apt-get install mmdebstrap (or pass --python-image)")
    mirror = debian_mirror()
    log(f"making {BASE_IMAGE} from {mirror}")
    debootstrap = subprocess.Popen(
        ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", "-", mirror],
        stdout=subprocess.PIPE,
    )
    subprocess.run([docker, "import", "-", BASE_IMAGE], stdin=debootstrap.stdout, check=True)
    if debootstrap.wait() != 0:
        sys.exit("mmdebstrap failed")


def download_wheels(torch_version: str) -> None:
    """wheels/: torch's CPU wheel (this machine's pip finds it) and every dependency of
    `.[weights]`, plus what building the editable install needs."""
    log("downloading wheels into wheels/")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "-d", str(ROOT / "wheels"),
         f"torch=={torch_version}", ".[weights]", "setuptools>=68", "wheel"],
        cwd=ROOT, check=True,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Container:
    def __init__(self, docker: str, image: str, model: Path) -> None:
        self.docker, self.port = docker, free_port()
        self.name = f"lamina-check-{os.getpid()}"
        self.url = f"http://127.0.0.1:{self.port}"
        sh(
            docker, "run", "-d", "--name", self.name,
            "-p", f"127.0.0.1:{self.port}:8000",
            "-v", f"{model}:/app/model_weights/{MODEL_DIR}:ro",
            "-e", "LAMINA_KV_CACHE_GB=0.5",
            "-e", f"LAMINA_DRAIN_TIMEOUT_S={DRAIN_TIMEOUT_S}",
            "--stop-timeout", str(DRAIN_TIMEOUT_S + 30),
            image,
        )  # fmt: skip

    def inspect(self, template: str) -> str:
        return sh(self.docker, "inspect", "-f", template, self.name).stdout.strip()

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.inspect("{{.State.Health.Status}}")
            if status == "healthy":
                return
            if self.inspect("{{.State.Running}}") != "true":
                break
            time.sleep(1)
        sys.exit(f"not healthy ({self.inspect('{{.State.Status}}')}):\n{self.logs()}")

    def wait_ready(self, timeout_s: float) -> None:
        """The image's HEALTHCHECK is liveness (/health answers while the model loads);
        requests wait for readiness, as a load balancer does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.inspect("{{.State.Running}}") == "true":
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sys.exit(f"not ready ({self.inspect('{{.State.Status}}')}):\n{self.logs()}")

    def logs(self) -> str:
        result = sh(self.docker, "logs", "--tail", "40", self.name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        sh(self.docker, "rm", "-f", self.name, check=False)


def chat(url: str, body: dict) -> dict:
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()


def stream_through_sigterm(container: Container) -> dict:
    """A stream in flight when the container gets SIGTERM: it must finish whole."""
    events: list[str] = []
    started = threading.Event()
    # The container's drain timeout is raised (DRAIN_TIMEOUT_S): on a loaded 2-core
    # machine 64 tokens can take longer than the default 30 s, and the drain would cut
    # them; this checks that a drain lets them finish.
    body = {"messages": PARIS, "max_tokens": 64, "ignore_eos": True, "stream": True}

    def run() -> None:
        url = container.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not started.wait(120):
        sys.exit("the stream sent nothing")
    signalled = time.monotonic()
    sh(container.docker, "kill", "--signal", "TERM", container.name)
    thread.join(300)
    exit_code = int(sh(container.docker, "wait", container.name).stdout.strip())
    finish = [
        c.get("finish_reason")
        for e in events
        if e != "[DONE]"
        for c in json.loads(e).get("choices", [])
        if c.get("finish_reason")
    ]
    logs = container.logs()
    errors = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
    return {
        "stream_done": bool(events) and events[-1] == "[DONE]",
        "stream_error": json.loads(errors[0])["error"].get("message") if errors else None,
        "finish_reason": finish[-1] if finish else None,
        "exit_code": exit_code,
        "drained_one_in_flight": "draining: 1 generation requests in flight" in logs,
        "sigterm_to_exit_s": round(time.monotonic() - signalled, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-image", help=f"the base image (default: {BASE_IMAGE})")
    parser.add_argument("--tag", default="lamina:cpu-check")
    parser.add_argument("--torch-version", default="2.13.0")
    parser.add_argument("--docker", default=os.environ.get("DOCKER"))
    parser.add_argument("--no-cache", action="store_true", help="build every layer anew")
    args = parser.parse_args(argv)
    model = (ROOT / "model_weights" / MODEL_DIR).resolve()
    if not (model / "config.json").is_file():
        sys.exit(f"{model} is missing: run `lamina weights` first")
    docker = docker_with_buildkit(args.docker)
    workdir = Path(tempfile.mkdtemp(prefix="container-check-"))
    daemon = Daemon(docker, workdir)
    timings: dict[str, float] = {}
    server_version = sh(docker, "version", "--format", "{{.Server.Version}}").stdout
    result: dict = {"docker": server_version.strip()}
    container = None
    try:
        started = time.monotonic()
        if args.python_image is None:
            ensure_base_image(docker)
        timings["base_image_s"] = time.monotonic() - started
        started = time.monotonic()
        download_wheels(args.torch_version)
        timings["wheels_s"] = time.monotonic() - started
        log(f"building {args.tag}")
        started = time.monotonic()
        build = subprocess.run(
            [docker, "build", "--network", "host", "--progress", "plain",
             "--build-arg", f"PYTHON_IMAGE={args.python_image or BASE_IMAGE}",
             "--build-arg", "PIP_NO_INDEX=1", "-t", args.tag,
             *(["--no-cache"] if args.no_cache else []), "."],
            cwd=ROOT, env={**os.environ, "DOCKER_BUILDKIT": "1"},
            stdout=(workdir / "build.log").open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        if build.returncode != 0:
            sys.exit(f"docker build failed: see {workdir / 'build.log'}")
        timings["build_s"] = time.monotonic() - started
        result["image_mb"] = round(
            int(sh(docker, "image", "inspect", "-f", "{{.Size}}", args.tag).stdout) / 2**20
        )
        started = time.monotonic()
        container = Container(docker, args.tag, model)
        container.wait_healthy(400)
        timings["start_to_healthy_s"] = time.monotonic() - started
        container.wait_ready(400)
        timings["start_to_ready_s"] = time.monotonic() - started
        started = time.monotonic()
        answer = chat(container.url, {"messages": PARIS, "temperature": 0})
        timings["chat_s"] = time.monotonic() - started
        result["answer"] = answer["choices"][0]["message"]["content"]
        result["uid"] = sh(docker, "exec", container.name, "id", "-u").stdout.strip()
        status = sh(docker, "exec", container.name, "cat", "/proc/1/status").stdout
        result["pid1_uid"] = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1)
        result["pid1"] = sh(docker, "exec", container.name, "cat", "/proc/1/cmdline").stdout
        result["pid1"] = result["pid1"].replace("\0", " ").strip()
        result.update(stream_through_sigterm(container))
    finally:
        if container is not None:
            container.remove()
        daemon.stop()
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    checks = {
        "healthy": "start_to_healthy_s" in timings,
        "answers Paris": "Paris" in result.get("answer", ""),
        "runs as uid 10001": result.get("uid") == result.get("pid1_uid") == "10001",
        "in-flight stream finished": result.get("stream_done")
        and result.get("stream_error") is None
        and result.get("finish_reason") == "length"
        and result.get("drained_one_in_flight"),
        "exit 0 after SIGTERM": result.get("exit_code") == 0,
    }
    result["checks"] = checks
    out = ROOT / "bench_results" / "container_check.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    failed = [name for name, ok in checks.items() if not ok]
    log("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
