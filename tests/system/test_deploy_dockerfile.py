"""The Dockerfile (hadolint, variants, runtime contract) and its build context."""

from __future__ import annotations

import json
import re

from tests.system.deploy_files import ROOT, assert_valid_settings, run, tool


def _dockerfile_stages() -> tuple[dict[str, str], dict[str, tuple[str, list]]]:
    """(global ARG defaults, {stage: (FROM image, [(INSTRUCTION, args)])})."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    global_args: dict[str, str] = {}
    stages: dict[str, tuple[str, list]] = {}
    current: list | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            image, _, name = args.partition(" AS ")
            current = []
            stages[name.strip()] = (image.strip(), current)
        elif current is None and instruction == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        elif current is not None:
            current.append((instruction, args.strip()))
    return global_args, stages


def _final_image_instructions(weights: str) -> list[tuple[str, str]]:
    """Instructions the image runs with, base stages first, for one WEIGHTS value."""
    _, stages = _dockerfile_stages()
    chain, stage = [], "final"
    while stage in stages:
        image, instructions = stages[stage]
        chain = instructions + chain
        stage = image.replace("${WEIGHTS}", weights)
    return chain


def test_hadolint():
    run([tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"], cwd=ROOT)


def test_dockerfile_variants_and_runtime_contract():
    global_args, stages = _dockerfile_stages()
    assert global_args["VARIANT"] == "cpu" and global_args["WEIGHTS"] == "mounted"
    assert {"torch-cpu", "torch-cuda", "weights-mounted", "weights-baked", "final"} <= set(stages)
    assert stages["build"][0] == "torch-${VARIANT}"
    for variant, default_index in (
        ("cpu", "https://download.pytorch.org/whl/cpu"),
        ("cuda", "https://pypi.org/simple"),  # the default wheel, CUDA runtime included
    ):
        instructions = stages[f"torch-{variant}"][1]
        install = " ".join(a for i, a in instructions if i == "RUN")
        args = dict(a.partition("=")[::2] for i, a in instructions if i == "ARG")
        assert "torch==" in install and '--index-url "${TORCH_INDEX_URL}"' in install
        assert args["TORCH_INDEX_URL"] == default_index
        # wheels/ in the context comes first (a mirror or no network at all).
        assert ("ENV", "PIP_FIND_LINKS=/tmp/wheels") in instructions
        assert ("COPY", "pyproject.toml wheel[s] /tmp/wheels/") in instructions
        assert {"PIP_INDEX_URL", "PIP_NO_INDEX"} <= set(args)
    assert any("lamina weights" in a for i, a in stages["weights"][1] if i == "RUN")
    # The runtime stage has no compiler: the native kernels are built in the build stage.
    assert any("app.native.build --portable" in a for i, a in stages["build"][1] if i == "RUN")
    for weights in ("mounted", "baked"):
        instructions = _final_image_instructions(weights)
        last = {i: a for i, a in instructions}
        assert last["USER"].split(":")[0] not in {"root", "0"}
        assert "/health" in last["HEALTHCHECK"]
        assert json.loads(last["ENTRYPOINT"]) == ["lamina"]  # exec form: PID 1 gets SIGTERM
        assert json.loads(last["CMD"]) == ["serve"]
        assert last["STOPSIGNAL"] == "SIGTERM" and last["EXPOSE"] == "8000"
        env = dict(
            re.findall(r"(LAMINA_\w+)=(\S+)", " ".join(a for i, a in instructions if i == "ENV"))
        )
        assert_valid_settings(env, f"Dockerfile (WEIGHTS={weights})")
    baked = [a for i, a in stages["weights-baked"][1] if i == "COPY"]
    assert baked == ["--from=weights /app/model_weights /app/model_weights"]


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""

    def matches(pattern: str, candidate: str) -> bool:
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        return re.fullmatch(regex.replace(r"\?", "[^/]"), candidate) is not None

    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(matches(pattern, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_build_context_holds_the_sources_and_nothing_heavy():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    _, stages = _dockerfile_stages()
    copied = [
        args.split()[:-1]
        for _, instructions in stages.values()
        for instruction, args in instructions
        if instruction == "COPY" and not args.startswith("--from")
    ]
    sources = [source for group in copied for source in group]
    assert sources, "the Dockerfile copies the project's files"
    for source in sources:
        if source == "wheel[s]":  # optional: a glob that may match nothing
            source = "wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
        else:
            assert (ROOT / source).exists(), source
        assert not _dockerignore_excludes(patterns, source), f"{source} is not in the context"
    assert not _dockerignore_excludes(patterns, "app/cli.py")
    for heavy in (
        "model_weights/smollm2-135m-instruct/model.safetensors",
        ".venv/bin/python",
        ".git/HEAD",
        "app/__pycache__/cli.cpython-311.pyc",
        "tests/conftest.py",
        ".pytest_cache/v/cache",
    ):
        assert _dockerignore_excludes(patterns, heavy), heavy
