"""llama.cpp for `lamina bench peers`: its `llama-server` and `llama-quantize` (and
`llama-perplexity` for `lamina bench perplexity`), each built once.

The sources come from the `llama-cpp-python` source distribution on PyPI, which vendors
llama.cpp under vendor/llama.cpp (pip is the only client this needs). It is built for
the CPU only (no CUDA, no curl, no TLS, no web UI: nothing is fetched at build time),
tuned for this CPU (GGML_NATIVE), and the binaries are cached under
`~/.cache/lamina/llama.cpp/<version>-<cpu key>/bin/`, so the next run finds them at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# The llama-cpp-python release whose vendored llama.cpp is built; `--llama-cpp-version`.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-quantize")
PERPLEXITY = "llama-perplexity"  # built only when `lamina bench perplexity` asks for it

# Options beyond the defaults; each keeps the build offline and CPU-only.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # this CPU's instruction sets, as lamina's own kernels use them
    "-DGGML_CUDA=OFF",
    "-DLLAMA_CURL=OFF",  # older releases: no model downloads
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the web UI is downloaded at build time
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries that can be copied to bin/
)

# CPU flags that change what GGML_NATIVE compiles: a cache built on one CPU is not
# reused on a CPU that lacks one of them.
NATIVE_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip


@dataclass(frozen=True)
class LlamaCpp:
    """Where one llama.cpp build lives: its sources (for the GGUF converter) and binaries,
    and the precisions whose server runs without its defaults in this run, with why
    (app/bench/peers.py: enter_llama_server)."""

    version: str
    source_dir: Path | None  # vendor/llama.cpp; None for a binary given with --llama-server
    server: Path
    quantize: Path | None
    flags_changed: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def converter(self) -> Path | None:
        return None if self.source_dir is None else self.source_dir / "convert_hf_to_gguf.py"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lamina" / "llama.cpp"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` of /proc/cpuinfo's first processor (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def build_key(version: str, flags: set[str]) -> str:
    """`<version>-<8 hex>`: the release and the native instruction sets it was built for."""
    native = ",".join(sorted(flags & set(NATIVE_FLAGS)))
    options = " ".join(CMAKE_OPTIONS)
    digest = hashlib.sha256(f"{native}|{options}".encode()).hexdigest()[:8]
    return f"{version}-{digest}"


def cmake_commands(
    source: Path, build: Path, jobs: int, targets: tuple[str, ...] = TARGETS
) -> list[list[str]]:
    """The configure and build command lines (only the targets the benchmark needs)."""
    cmake = shutil.which("cmake") or "cmake"
    return [
        [cmake, "-S", str(source), "-B", str(build), *CMAKE_OPTIONS],
        [cmake, "--build", str(build), "-j", str(jobs), "--target", *targets],
    ]


def find_or_build(
    version: str = LLAMA_CPP_PYTHON_VERSION, log=print, extra: tuple[str, ...] = ()
) -> LlamaCpp:
    """The cached build of `version` for this CPU, building first whichever of TARGETS
    and `extra` (e.g. PERPLEXITY) is absent."""
    home = cache_root() / build_key(version, cpu_flags())
    source = home / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    bin_dir = home / "bin"
    missing = tuple(t for t in TARGETS + extra if not (bin_dir / t).is_file())
    if missing:
        if not source.is_dir():
            _unpack_sdist(version, home / "src", log)
        _build(source, home / "build", bin_dir, missing, log)
    return LlamaCpp(version, source, bin_dir / "llama-server", bin_dir / "llama-quantize")


def given_server(server: Path, version: str = LLAMA_CPP_PYTHON_VERSION, log=print) -> LlamaCpp:
    """An existing `llama-server` (--llama-server): its sibling `llama-quantize` if any;
    the converter's sources still come from the cached (or freshly unpacked) sdist."""
    if not server.is_file():
        raise SystemExit(f"--llama-server {server}: no such file")
    quantize = server.parent / "llama-quantize"
    home = cache_root() / build_key(version, cpu_flags())
    source = home / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        _unpack_sdist(version, home / "src", log)
    return LlamaCpp("given", source, server, quantize if quantize.is_file() else None)


def _unpack_sdist(version: str, into: Path, log) -> None:
    log(f"[peers] downloading llama-cpp-python=={version} (source distribution) ...")
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            "-d", tmp, f"llama-cpp-python=={version}",
        ]  # fmt: skip
        subprocess.run(command, check=True)
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")


def _build(source: Path, build: Path, bin_dir: Path, targets: tuple[str, ...], log) -> None:
    jobs = os.cpu_count() or 1
    log(f"[peers] building llama.cpp {' '.join(targets)} with {jobs} jobs (once; slow) ...")
    for command in cmake_commands(source, build, jobs, targets):
        subprocess.run(command, check=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        built = build / "bin" / target
        staged = bin_dir / f".{target}.tmp"
        shutil.copy2(built, staged)
        staged.replace(bin_dir / target)  # atomic: a half-copied binary is never cached
