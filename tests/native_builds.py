"""Every kernels library the tests run: each instruction-set level this CPU can execute
(-march=native and the portable levels shipped for its machine kind), built by gcc and by
clang. A level the CPU cannot run, or a compiler that is not installed, is a skip with
its reason; a build that fails is a failure.

The compiles (eight libraries and the C driver twice: ~60 s of CPU from a cold cache) start
at the session's beginning in a background process at the lowest CPU priority
(`start_prebuild`), so they take the CPU the tests leave idle instead of holding up the
first test that needs them; that test waits for the process (`wait_for_prebuild`), then
builds what is still missing itself and reports any failure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.native.build import (
    NATIVE,
    PORTABLE_LEVELS,
    Build,
    NativeBuildError,
    build_level,
    build_program,
    find_compiler,
    runnable_levels,
)

COMPILERS = ("gcc", "clang")
NOT_INSTALLED = "{} is not installed (`make test` installs it when run as root on Debian)"

BuildKey = tuple[str, str]  # (level, compiler)
REPO_ROOT = Path(__file__).resolve().parents[1]
# The C driver of the kernels (tests/unit/test_native_builds.py), run natively and, cross-
# compiled for armv8-a, under qemu.
DRIVER = REPO_ROOT / "tests" / "native" / "kernel_driver.c"
CROSS_COMPILER = "aarch64-linux-gnu-gcc"


def levels_of_this_machine_kind() -> list[str]:
    return [NATIVE] + [level for level, _ in PORTABLE_LEVELS.get(platform.machine(), ())]


def build_params() -> list:
    """One pytest param per (level, compiler), skipped with a reason where it cannot run."""
    runnable = runnable_levels()
    params = []
    for compiler in COMPILERS:
        for level in levels_of_this_machine_kind():
            marks = ()
            if shutil.which(compiler) is None:
                marks = pytest.mark.skip(reason=NOT_INSTALLED.format(compiler))
            elif level not in runnable:
                marks = pytest.mark.skip(reason=f"this CPU cannot run {level} code")
            params.append(pytest.param((level, compiler), id=f"{level}-{compiler}", marks=marks))
    return params


def build_keys() -> list[BuildKey]:
    return [(level, c) for c in COMPILERS if shutil.which(c) for level in runnable_levels()]


def build_all() -> dict[BuildKey, Build | NativeBuildError]:
    """Every runnable (level, compiler), compiled concurrently into the user's cache (so
    only a first run, or an edit to the kernels, compiles)."""
    keys = build_keys()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {key: pool.submit(build_level, *key) for key in keys}
    results: dict[BuildKey, Build | NativeBuildError] = {}
    for key, future in futures.items():
        try:
            results[key] = future.result()
        except NativeBuildError as exc:
            results[key] = exc
    return results


def prebuild() -> None:
    """Compile into the user's cache what the kernel tests will load, as build_all does
    (one compiler per core): every library of build_all (native-gcc last: the session's
    first server compiles that one for itself), then the C driver for this CPU and for
    aarch64. A failure is left for the test that needs the build to report."""
    keys = sorted(build_keys(), key=lambda key: key == (NATIVE, "gcc"))
    builds = [functools.partial(build_level, *key) for key in keys]
    if (compiler := find_compiler()) is not None:
        builds.append(functools.partial(build_program, DRIVER, NATIVE, compiler))
    cross = CROSS_COMPILER if platform.machine() != "aarch64" else "gcc"
    if shutil.which(cross) is not None:
        builds.append(functools.partial(build_program, DRIVER, "armv8-a", cross))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for build in builds:
            pool.submit(_ignoring_failures, build)


def _ignoring_failures(build: Callable[[], object]) -> None:
    with contextlib.suppress(NativeBuildError):
        build()


_prebuild: subprocess.Popen | None = None


def start_prebuild() -> None:
    """`prebuild()` in a background process at the lowest CPU priority (nice 19, in this
    process's session, so the priority counts against the tests' own processes)."""
    global _prebuild
    if _prebuild is None:
        _prebuild = subprocess.Popen(
            [sys.executable, "-m", "tests.native_builds"],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def wait_for_prebuild(timeout_s: float = 1800.0) -> None:
    """Let the background compiles finish (they get the whole CPU while a test waits)."""
    if _prebuild is not None:
        try:
            _prebuild.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop_prebuild()


def stop_prebuild() -> None:
    """End the background compiles, if still running (a session that ended early)."""
    if _prebuild is not None and _prebuild.poll() is None:
        try:  # the process and its compilers: it leads their process group
            os.killpg(_prebuild.pid, signal.SIGTERM)
        except ProcessLookupError:  # not yet its own group leader
            _prebuild.terminate()
        _prebuild.wait(30)


if __name__ == "__main__":
    # Its own process group (not session: the scheduler weighs priorities within one) for
    # stop_prebuild; nice 19, which its compilers inherit.
    os.setpgrp()
    os.nice(19)
    prebuild()
