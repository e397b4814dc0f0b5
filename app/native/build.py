"""Compile app/native/kernels.c for the machine that runs it, once, and cache the library.

The library is built with `-march=native`, so a cached copy is only reused on the same
kind of CPU with the same compiler and source: all three go into its file name. Builds
are atomic (compile to a temporary name, then rename), so concurrent servers starting
on one machine never load a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",  # resolves to the libgomp torch has loaded: one worker pool
    "-ffp-contract=fast",  # a * b + c as one FMA; fixed per build, so still deterministic
    "-shared",
    "-fPIC",
    "-Wall",
)
COMPILE_TIMEOUT_S = 120


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled; the message says why in one line or a few."""


def cache_dir() -> Path:
    """Where compiled libraries live: LAMINA_NATIVE_CACHE, else the user's cache folder."""
    if explicit := os.environ.get("LAMINA_NATIVE_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lamina" / "native"


def find_compiler() -> str | None:
    """$CC if set, else the first C compiler on PATH."""
    if explicit := os.environ.get("CC"):
        return shutil.which(explicit)
    for name in ("cc", "gcc", "clang"):
        if found := shutil.which(name):
            return found
    return None


def library_path(compiler: str, directory: Path | None = None) -> Path:
    """The cached library's path for this source, compiler, flags and CPU."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(_compiler_version(compiler).encode())
    digest.update(_cpu_signature().encode())
    return (directory or cache_dir()) / f"lamina-kernels-{digest.hexdigest()[:16]}.so"


def build_library(directory: Path | None = None) -> Path:
    """Path to a compiled library for this machine, compiling it first if needed."""
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError("no C compiler found (set CC or install gcc)")
    target = library_path(compiler, directory)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeBuildError(f"cannot create {target.parent}: {exc}") from None
    _compile(compiler, target)
    return target


def _compile(compiler: str, target: Path) -> None:
    fd, temporary = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    command = [compiler, *FLAGS, str(SOURCE), "-o", temporary]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise NativeBuildError(f"{Path(compiler).name} failed: {tail}")
        os.replace(temporary, target)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"compiling took over {COMPILE_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"cannot run {compiler}: {exc}") from None
    return result.stdout


def _cpu_signature() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    lines = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if line.strip() == "":  # the first processor describes them all
                    break
    except OSError:
        pass
    return "\n".join(lines)
