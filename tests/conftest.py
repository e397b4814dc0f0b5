"""Fixtures shared by every test folder. Folder-specific fixtures live in that folder."""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import weights
from app.logging_setup import make_handler
from app.weights import default_model_dir, is_complete
from tests.server_process import (
    SERVER_POOL,
    ServerProcess,
    engine_available,
    planner_of,
    takes_servers,
)


@pytest.fixture(scope="session", autouse=True)
def planned_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Starts in the background, in the tests' order, the servers that the session's
    `@takes_servers` fixtures will take (tests/server_process.py, ServerPool); stops
    those no test took."""
    planned: set[int] = set()  # fixtures wider than a test: planned once
    for item in request.session.items:
        info = getattr(item, "_fixtureinfo", None)
        for name in info.names_closure if info is not None else ():
            fixturedefs = info.name2fixturedefs.get(name)
            if not fixturedefs or id(fixturedefs[-1]) in planned:
                continue
            if fixturedefs[-1].scope != "function":
                planned.add(id(fixturedefs[-1]))
            planner = planner_of(fixturedefs[-1].func)
            if planner is not None:
                # Planned as found: the first servers load while later planners make
                # their models (the tiny and the shallow one, seconds each).
                SERVER_POOL.plan(planner(request, item))
    yield
    SERVER_POOL.close()


def lamina_server_env(request: pytest.FixtureRequest, marker: pytest.Mark) -> dict[str, str]:
    """The `lamina_server` marker's environment, its `model` (a fixture's name) given as
    LAMINA_MODEL."""
    env = dict(marker.kwargs)
    model = env.pop("model", None)
    if model is not None:
        env["LAMINA_MODEL"] = str(request.getfixturevalue(model))
    return env


def _planned_lamina_server(request: pytest.FixtureRequest, item: pytest.Item) -> list[dict]:
    marker = item.get_closest_marker("lamina_server")
    if marker is None or not engine_available():
        return []
    return [lamina_server_env(request, marker)]


@pytest.fixture
@takes_servers(_planned_lamina_server)
def lamina_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The test's own `lamina serve`, with the environment of its `lamina_server` marker
    (`model=` names the fixture that gives LAMINA_MODEL), started ahead of time by the
    server pool. It may still be loading: the test calls wait_ready(). Stopped after it."""
    marker = request.node.get_closest_marker("lamina_server")
    if marker is None:
        pytest.fail("the lamina_server fixture needs a @pytest.mark.lamina_server(...) marker")
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    server = SERVER_POOL.take(lamina_server_env(request, marker))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default SmolLM2-135M-Instruct folder (`make test` prepares it first)."""
    path = default_model_dir()
    if not is_complete(path):
        pytest.fail(f"{path} is missing: run `lamina weights` (make test does it)")
    return path


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's Q4_1 GGUF file, kept by `lamina weights` beside its folder."""
    path = weights.default_gguf_path()
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `lamina weights` (make test does it)")
    return path


@pytest.fixture(scope="session")
def native():
    """lamina's compiled CPU kernels. Skips only where there is no C compiler at all; CI
    has gcc, so there a failed build fails the test instead of hiding behind a skip."""
    from app.native import native_kernels
    from app.native.build import find_compiler

    kernels = native_kernels()
    if kernels is None:
        if find_compiler() is not None:
            pytest.fail("a C compiler is present but the native kernels did not build")
        pytest.skip("no C compiler: the native kernels are unavailable")
    return kernels


# The fixtures whose tests load the builds that tests/native_builds.py prebuilds, and how
# many tests must come before the first of them for a head start to be worth it (a session
# of these tests alone would rather wait for its own builds only).
PREBUILT_FOR = {"kernels", "kernel_builds", "aarch64_driver"}
PREBUILD_HEAD_START = 100


@pytest.fixture(scope="session", autouse=True)
def prebuilt_kernels(request: pytest.FixtureRequest) -> Iterator[None]:
    """Where the session's tests of every kernel build come after at least
    PREBUILD_HEAD_START others (the whole suite), compiles those builds in the background
    from its start, at the lowest CPU priority (tests/native_builds.py)."""
    items = request.session.items
    first = next((i for i, item in enumerate(items) if PREBUILT_FOR & set(item.fixturenames)), 0)
    if first < PREBUILD_HEAD_START:
        yield
        return
    from tests.native_builds import start_prebuild, stop_prebuild

    start_prebuild()
    yield
    stop_prebuild()


@pytest.fixture(scope="session")
def kernel_builds():
    """Every runnable (level, compiler) library, built once (tests/native_builds.py)."""
    from tests.native_builds import build_all, wait_for_prebuild

    wait_for_prebuild()
    return build_all()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `kernels` runs once per (level, compiler) library; the list is
    made only then (it imports app.native, hence torch)."""
    if "kernels" in metafunc.fixturenames:
        from tests.native_builds import build_params

        metafunc.parametrize("kernels", build_params(), indirect=True, scope="session")


@pytest.fixture(scope="session")
def kernels(request, kernel_builds):
    """The native kernels of one instruction-set level and compiler: a test that takes
    this fixture runs on every library this CPU can execute (native, x86-64-v4, x86-64-v3
    on x86; gcc and clang)."""
    from app.native import NativeKernels

    build = kernel_builds[request.param]
    if isinstance(build, Exception):
        pytest.fail(f"{request.param[1]} could not build the {request.param[0]} kernels: {build}")
    return NativeKernels(build)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """A tiny random LLaMA (2 layers, GQA, untied head) with the default model's tokenizer.

    Fast enough for unit tests; transformers writes it, so it is a faithful HF layout.
    """
    from tests.model.helpers import save_random_llama  # imports torch: only when needed

    out = save_random_llama(
        tmp_path_factory.mktemp("tiny-llama"),
        vocab_size=49152,  # the default model's tokenizer
        intermediate_size=128,
        max_position_embeddings=1024,
        pad_token_id=2,
    )
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        src = default_model_path / name
        if src.is_file():
            shutil.copy(src, out / name)
    return out


SHALLOW_LAYERS = 6


@pytest.fixture(scope="session")
def shallow_default_model_path(
    tmp_path_factory: pytest.TempPathFactory, default_model_path: Path
) -> Path:
    """The default model cut to its first SHALLOW_LAYERS of 30 decoder layers.

    Real weights, so real (peaked) distributions, and the very same kernels and shapes as
    the full model (hidden size, heads, vocabulary, tied head) at a fifth of the cost: for
    properties that hold layer by layer, such as batch invariance, where depth adds time
    and no coverage. Parity with transformers and output quality stay on the full model.
    """
    import json

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("shallow-default")
    kept = {
        name: tensor
        for name, tensor in load_file(default_model_path / "model.safetensors").items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < SHALLOW_LAYERS
    }
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((default_model_path / "config.json").read_text())
    config["num_hidden_layers"] = SHALLOW_LAYERS
    (out / "config.json").write_text(json.dumps(config))
    for src in default_model_path.iterdir():
        if src.name not in ("model.safetensors", "config.json") and src.is_file():
            shutil.copy(src, out / src.name)
    return out


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """JSON log lines of every `lamina.*` logger while the test runs."""
    stream = io.StringIO()
    handler = make_handler("json", stream)
    lamina = logging.getLogger("lamina")
    level = lamina.level
    lamina.addHandler(handler)
    lamina.setLevel(logging.DEBUG)
    yield stream
    lamina.removeHandler(handler)
    lamina.setLevel(level)
