"""The kernels on an instruction set this machine's Python cannot load: aarch64, cross-
compiled with Debian's gcc-aarch64-linux-gnu and run under qemu-aarch64, through a C
driver (tests/native/kernel_driver.c: matmul (fp32, fp16, bf16, int8 and 4-bit panels) and attention
against double references, each row's bits alone). The same driver runs natively too, so
its verdict is checked where the Python tests give theirs. `make test` installs the cross
compiler and qemu-user when run as root on Debian; without them these tests skip and say
so."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from app.native import build as native_build
from tests.native_builds import CROSS_COMPILER, DRIVER, wait_for_prebuild

AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's libc6-arm64-cross
ELF_MACHINE_AARCH64 = 183
INSTALL_HINT = "(`make test` installs it when run as root on Debian)"
DRIVER_CHECKS = 24  # "ok ...": 8 matmul fp32/fp16, 4 bf16, 4 int8, 4 int4, 4 attention


def run_driver(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == DRIVER_CHECKS, result.stdout
    assert lines[-1] == "all checks passed"


def elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def test_the_driver_passes_on_this_cpu():
    compiler = native_build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    wait_for_prebuild()
    program = native_build.build_program(DRIVER, native_build.NATIVE, compiler)
    run_driver([str(program)])


@pytest.fixture(scope="module")
def aarch64_driver() -> Path:
    """The driver and kernels compiled for armv8-a (the portable ARM level)."""
    compiler = CROSS_COMPILER if platform.machine() != "aarch64" else "gcc"
    if shutil.which(compiler) is None:
        pytest.skip(f"{CROSS_COMPILER} is not installed {INSTALL_HINT}")
    wait_for_prebuild()
    return native_build.build_program(DRIVER, "armv8-a", compiler)


def test_the_kernels_cross_compile_for_aarch64(aarch64_driver):
    assert elf_machine(aarch64_driver) == ELF_MACHINE_AARCH64


def test_the_aarch64_kernels_pass_the_driver_under_qemu(aarch64_driver):
    if platform.machine() == "aarch64":
        run_driver([str(aarch64_driver)])
        return
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if qemu is None:
        pytest.skip(f"compiled for aarch64 but not run: qemu-user is not installed {INSTALL_HINT}")
    run_driver([qemu, "-L", AARCH64_SYSROOT, str(aarch64_driver)])
