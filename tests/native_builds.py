"""Every kernels library the tests run: each instruction-set level this CPU can execute
(-march=native and the portable levels shipped for its machine kind), built by gcc and by
clang. A level the CPU cannot run, or a compiler that is not installed, is a skip with
its reason; a build that fails is a failure."""

from __future__ import annotations

import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.native.build import (
    NATIVE,
    PORTABLE_LEVELS,
    Build,
    NativeBuildError,
    build_level,
    runnable_levels,
)

COMPILERS = ("gcc", "clang")
NOT_INSTALLED = "{} is not installed (`make test` installs it when run as root on Debian)"

BuildKey = tuple[str, str]  # (level, compiler)


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


def build_all() -> dict[BuildKey, Build | NativeBuildError]:
    """Every runnable (level, compiler), compiled concurrently into the user's cache (so
    only a first run, or an edit to the kernels, compiles)."""
    keys = [(level, c) for c in COMPILERS if shutil.which(c) for level in runnable_levels()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {key: pool.submit(build_level, *key) for key in keys}
    results: dict[BuildKey, Build | NativeBuildError] = {}
    for key, future in futures.items():
        try:
            results[key] = future.result()
        except NativeBuildError as exc:
            results[key] = exc
    return results
