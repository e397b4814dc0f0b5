"""Every `lamina`, `make` and `python -m` command README.md shows parses as written: the
subcommand and its flags exist (checked with the real argument parsers, without
running anything), each `LAMINA_*` assignment is a valid setting, each make target
exists and each module can be imported. The curl and Python examples themselves run
against a live server in tests/api/test_docs_examples.py."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from app import cli
from app.bench import engine_bench, fleet_bench, kernel_bench, peers, perplexity, serve_bench
from app.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^`\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
# Inline code only: a fence's opening (```python) is not a `python ...` command.
INLINE = re.compile(r"(?<!`)`((?:\.venv/bin/)?(?:lamina|make|python)\s[^`]+)`")
PROGRAMS = ("lamina", "make", "python")
BENCH_PARSERS = {
    "engine": engine_bench.parse_args,
    "fleet": fleet_bench.parse_args,
    "kernels": kernel_bench.parse_args,
    "peers": peers.parse_args,
    "perplexity": perplexity.parse_args,
    "serve": serve_bench.parse_args,
}
MAKEFILE = (ROOT / "Makefile").read_text()
MAKE_TARGETS = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, re.MULTILINE))
MAKE_VARIABLES = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", MAKEFILE, re.MULTILINE))


def shell_lines(block: str) -> list[str]:
    """The block's command lines: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = (line.split(" #", 1)[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def readme_commands() -> list[str]:
    """Command lines of ```bash (or bare ```) blocks and inline code that start with one
    of PROGRAMS, after any VAR=value assignments and a `.venv/bin/` prefix."""
    text = README.read_text()
    candidates = [
        line
        for match in FENCE.finditer(text)
        if match.group(1).split()[:1] in ([], ["bash"])
        for line in shell_lines(match.group(2))
    ]
    # Inline code that quotes output ("lamina serve: invalid settings: ...") is no command.
    candidates += [" ".join(span.split()) for span in INLINE.findall(text) if ": " not in span]
    return [line for line in candidates if program_of(line) in PROGRAMS]


def split_command(line: str) -> tuple[dict[str, str], list[str]]:
    """(the VAR=value assignments before the command, the command's words)."""
    words = shlex.split(line)
    environment = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        environment[name] = value
    if words:
        words[0] = words[0].removeprefix(".venv/bin/")
    return environment, words


def program_of(line: str) -> str | None:
    words = split_command(line)[1]
    return words[0] if words else None


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_every_kind() -> None:
    programs = {program_of(line) for line in COMMANDS}
    assert programs == set(PROGRAMS), programs
    assert {"make run", "make test"} <= set(COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses(line: str) -> None:
    environment, words = split_command(line)
    settings = {name: value for name, value in environment.items() if name.startswith("LAMINA_")}
    load_settings(settings)  # raises SettingsError on an unknown name or a bad value
    program, args = words[0], words[1:]
    if program == "make":
        targets = [arg for arg in args if "=" not in arg]
        assert set(targets) <= MAKE_TARGETS, f"{line}: no such make target"
        variables = {arg.split("=", 1)[0] for arg in args if "=" in arg}
        assert variables <= MAKE_VARIABLES, f"{line}: no such Makefile variable"
    elif program == "python":
        assert args[0] == "-m", line
        assert importlib.util.find_spec(args[1]) is not None, f"{line}: no module {args[1]}"
    elif args[:1] == ["bench"]:
        assert args[1] in BENCH_PARSERS, line
        BENCH_PARSERS[args[1]](args[2:])  # argparse exits (status 2) on an unknown flag
    else:
        cli.build_parser().parse_args(args)
