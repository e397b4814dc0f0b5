"""Compile app/native/kernels.c for the machine that runs it, once, and cache the library.

The library is built with `-march=native`, so a cached copy is only reused on the same
kind of CPU with the same compiler and source: all three go into its file name. Builds
are atomic (compile to a temporary name, then rename), so concurrent servers starting
on one machine never load a half-written file.

Images without a compiler (the Docker runtime stage) ship *portable* builds instead,
made by `python -m app.native.build --portable` in a stage that has one: one library per
CPU level (x86-64-v4-bf16, x86-64-v4, x86-64-v3 on x86; armv8-a on ARM) in
app/native/prebuilt/, and the best level this CPU supports is loaded when no compiler is
found.

`build_level(level, compiler)` compiles any one of them (or -march=native) with a given
compiler into the cache, so the tests and `lamina bench kernels --isa` run every level
this CPU can execute, with gcc and with clang.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
PREBUILT_DIR = Path(__file__).with_name("prebuilt")
FLAGS = (
    "-O3",
    "-fopenmp",  # resolves to the libgomp torch has loaded: one worker pool
    "-ffp-contract=fast",  # a * b + c as one FMA; fixed per build, so still deterministic
    "-shared",
    "-fPIC",
    "-Wall",
    "-Wno-psabi",  # 64-byte vectors between static functions on AVX2-only builds: internal
)
# A runaway compiler is stopped by its CPU time (a compile takes ~7 s of CPU with gcc,
# ~14 with clang), not by the clock: on a loaded 2-core machine a healthy clang build
# took 124 s of wall time. The wall limit only catches a compiler that waits forever.
COMPILE_CPU_LIMIT_S = 120
COMPILE_TIMEOUT_S = 900
NATIVE = "native"  # -march=native: every instruction this CPU has
# Portable CPU levels per machine, best first, with the /proc/cpuinfo flags each needs.
_AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
PORTABLE_LEVELS = {
    "x86_64": (
        # AVX-512 with bf16 and int8 dot products (Zen 4, Sapphire Rapids, Cooper Lake: each
        # has AVX512-VNNI beside AVX512-BF16): without it a prebuilt x86-64-v4 library
        # widens bf16 weights into FMAs and multiplies int8 with vpmaddubsw on those CPUs.
        ("x86-64-v4-bf16", _AVX512 | {"avx512_bf16", "avx512_vnni"}),
        ("x86-64-v4", _AVX512),
        ("x86-64-v3", {"avx2", "fma", "bmi2", "f16c", "movbe"}),
    ),
    "aarch64": (("armv8-a", set()),),
}
# The compiler's target flags of a level that is not a -march name of its own.
LEVEL_TARGET = {"x86-64-v4-bf16": ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni")}


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled; the message says why in one line or a few."""


@dataclass(frozen=True)
class Build:
    """One kernels library and how it came to be: what the start-up log reports."""

    path: Path
    level: str  # NATIVE or a portable level ("x86-64-v3", "x86-64-v4-bf16", "armv8-a")
    compiler: str = ""  # "gcc 12.2.0", "clang 14.0.6"; "" for a prebuilt library
    not_compiled_because: str = ""  # a prebuilt library: why none was compiled here

    @property
    def prebuilt(self) -> bool:
        return not self.compiler

    def describe(self) -> str:
        """One line: the instruction-set level, the compiler or why a prebuilt one."""
        if self.prebuilt:
            return (
                f"prebuilt {self.level} library {self.path.name} "
                f"(not compiled here: {self.not_compiled_because})"
            )
        target = f"-march=native for {_cpu_model()}" if self.level == NATIVE else self.level
        return f"{target}, built by {self.compiler} ({self.path.name})"


def cache_dir() -> Path:
    """Where libraries compiled for this machine live: the user's cache folder."""
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


def runnable_levels() -> list[str]:
    """NATIVE and every portable level this CPU can run, best first."""
    flags = _cpu_flags()
    portable = PORTABLE_LEVELS.get(platform.machine(), ())
    return [NATIVE] + [level for level, needs in portable if needs <= flags]


def library_path(compiler: str, directory: Path | None = None, level: str = NATIVE) -> Path:
    """The cached library's path for this source, compiler, flags and level (and the CPU,
    for NATIVE)."""
    digest = hashlib.sha256()
    digest.update(_source_digest().encode())
    digest.update(_compiler_identity(compiler).encode())
    if level == NATIVE:
        digest.update(_cpu_signature().encode())
        suffix = ""
    else:
        digest.update(level.encode())
        suffix = f"-{level}"
    return (directory or cache_dir()) / f"lamina-kernels-{digest.hexdigest()[:16]}{suffix}.so"


def build_level(
    level: str = NATIVE, compiler: str | None = None, directory: Path | None = None
) -> Build:
    """The library for one level (NATIVE or a portable one), compiled by `compiler` (a
    name on PATH or a path; default find_compiler()) unless already cached in
    `directory` (default cache_dir())."""
    if compiler is None:
        path = _require_compiler()
    elif (path := shutil.which(compiler)) is None:
        raise NativeBuildError(f"compiler {compiler} not found")
    target = library_path(path, directory, level)
    if not target.exists():
        _compile(path, level, target)
    return Build(target, level, compiler_label(path))


def build_library(directory: Path | None = None) -> Build:
    """A library for this machine: compiled (and cached) with -march=native if there is a
    compiler, else (no compiler, a read-only home in a container, a broken toolchain) the
    best portable build shipped in PREBUILT_DIR."""
    try:
        return build_level(NATIVE, directory=directory)
    except NativeBuildError as exc:
        if prebuilt := find_prebuilt():
            return Build(prebuilt, _level_of(prebuilt), not_compiled_because=str(exc))
        raise NativeBuildError(
            f"{exc}; no prebuilt library for this CPU in {PREBUILT_DIR}"
        ) from None


def build_portable(directory: Path | None = None) -> list[Path]:
    """One library per portable CPU level of this machine kind in `directory` (default
    PREBUILT_DIR), copied from the cache when already compiled there."""
    compiler = _require_compiler()
    built = []
    for level, _ in PORTABLE_LEVELS.get(platform.machine(), ()):
        target = portable_path(level, directory)
        try:
            cached = build_level(level, compiler)
        except NativeBuildError:  # no usable cache: compile in place
            _compile(compiler, level, target)
        else:
            _copy_atomically(cached.path, target)
        built.append(target)
    return built


def _require_compiler() -> str:
    if (compiler := find_compiler()) is None:
        raise NativeBuildError("no C compiler found (set CC or install gcc)")
    return compiler


def find_prebuilt(directory: Path | None = None) -> Path | None:
    """The best portable build of this source that this CPU can run, if one is shipped
    (in PREBUILT_DIR by default)."""
    flags = _cpu_flags()
    for level, needs in PORTABLE_LEVELS.get(platform.machine(), ()):
        path = portable_path(level, directory)
        if path.exists() and needs <= flags:
            return path
    return None


def portable_path(level: str, directory: Path | None = None) -> Path:
    return (directory or PREBUILT_DIR) / f"lamina-kernels-{_source_digest()[:16]}-{level}.so"


def _level_of(prebuilt: Path) -> str:
    """The level in a portable library's name (portable_path's)."""
    return prebuilt.stem.split("-", 3)[3]


def compiler_label(compiler: str) -> str:
    """The compiler's kind and version from its --version line: "gcc 12.2.0"."""
    first_line = (_compiler_version(compiler).splitlines() or [""])[0]
    lowered = first_line.lower()
    if "clang" in lowered:
        kind = "clang"
    elif "gcc" in lowered or lowered.startswith("cc "):  # Debian's cc is gcc
        kind = "gcc"
    else:
        kind = Path(compiler).name
    versions = re.findall(r"\b\d+\.\d+(?:\.\d+)?\b", first_line)
    return f"{kind} {versions[-1]}" if versions else kind


def _source_digest() -> str:
    """Of kernels.c, the parts it includes (every header beside it) and the flags."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in sorted(SOURCE.parent.glob("*.h")):
        digest.update(part.name.encode() + b"\0" + part.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    return digest.hexdigest()


def build_program(program: Path, level: str, compiler: str, directory: Path | None = None) -> Path:
    """An executable of `program`, a C file that includes kernels.c (the tests' driver,
    tests/native/kernel_driver.c), compiled like the library for `level` by `compiler`
    (a cross compiler too), cached in `directory` (default cache_dir())."""
    if (path := shutil.which(compiler)) is None:
        raise NativeBuildError(f"compiler {compiler} not found")
    digest = hashlib.sha256(program.read_bytes())
    digest.update(library_path(path, directory, level).name.encode())  # source, compiler
    target = (directory or cache_dir()) / f"{program.stem}-{digest.hexdigest()[:16]}-{level}"
    if not target.exists():
        _compile(path, level, target, program)
    return target


def _compile(compiler: str, march: str, target: Path, program: Path | None = None) -> None:
    """The library (or, given `program`, an executable of it, kernels.c included) for
    `march`, a level (LEVEL_TARGET's flags) or a -march name."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeBuildError(f"cannot create {target.parent}: {exc}") from None
    try:
        fd, temporary = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise NativeBuildError(f"cannot write to {target.parent}: {exc}") from None
    os.close(fd)
    target_flags = LEVEL_TARGET.get(march, (f"-march={march}",))
    if program is None:
        command = [compiler, *FLAGS, *target_flags, str(SOURCE), "-o", temporary]
    else:
        flags = [flag for flag in FLAGS if flag not in ("-shared", "-fPIC")]
        command = [compiler, *flags, *target_flags, f"-I{SOURCE.parent}", str(program)]
        command += ["-o", temporary, "-lm"]
    try:
        limited = ["sh", "-c", f'ulimit -t {COMPILE_CPU_LIMIT_S} && exec "$@"', "sh", *command]
        result = subprocess.run(
            limited, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
        )
        if result.returncode == -signal.SIGXCPU:
            raise NativeBuildError(f"compiling used over {COMPILE_CPU_LIMIT_S} s of CPU")
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            if "omp.h" in result.stderr:  # clang without LLVM's OpenMP runtime headers
                tail += "\n(OpenMP headers missing: install libomp-dev for clang)"
            raise NativeBuildError(f"{Path(compiler).name} failed: {tail}")
        os.chmod(temporary, 0o755)  # mkstemp's 0600 would make a program unrunnable
        os.replace(temporary, target)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"compiling took over {COMPILE_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _compiler_identity(compiler: str) -> str:
    """Its --version text without the program's name: `cc` and `gcc` (one compiler under
    two names) share cached libraries."""
    first_line, _, rest = _compiler_version(compiler).partition("\n")
    return first_line.partition(" ")[2] + "\n" + rest


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, temporary)
    os.chmod(temporary, 0o755)
    os.replace(temporary, target)


@functools.lru_cache(maxsize=8)
def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"cannot run {compiler}: {exc}") from None
    return result.stdout


def _cpu_model() -> str:
    for line in _cpu_signature().splitlines():
        if line.startswith(("model name", "CPU part")):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _cpu_flags() -> set[str]:
    for line in _cpu_signature().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


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


def main(argv: list[str] | None = None) -> int:
    """`python -m app.native.build [--portable]`: compile now (for images and CI logs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m app.native.build", description=main.__doc__)
    parser.add_argument(
        "--portable",
        action="store_true",
        help=f"build every portable CPU level into {PREBUILT_DIR} (for images without gcc)",
    )
    args = parser.parse_args(argv)
    try:
        paths = build_portable() if args.portable else [build_library().path]
    except NativeBuildError as exc:
        print(f"native kernels: {exc}")
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
