"""Every curl and Python example in README.md runs against a live server, so the
documentation cannot drift from the API. Examples that need more than a lamina server
(docker compose) are excluded by a named rule in their fence, and every example is
counted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.api.conftest import LiveServer
from tests.server_process import REPO_ROOT

DOC_URL = "http://localhost:8000"
DOCUMENTS = ("README.md",)
# A fenced block: its info string (```bash needs-docker) and its body.
FENCE = re.compile(r"^```([^`\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)

# Which examples are not run here, by name. An example is a ```bash block with a line
# starting with `curl`, or a ```python block that uses the documented URL; it is
# excluded only when its fence names one of these rules after the language
# (```bash needs-docker), and a tag not listed here fails.
EXCLUSIONS = {
    "needs-docker": "needs `docker compose` and its nginx on :8080, not a bare lamina",
}
# How many examples the documents hold, run or excluded by each rule: an edit that adds,
# drops or retags an example must update this, so none is lost silently.
EXPECTED_COUNTS = {"curl": 10, "python": 3, "needs-docker": 1}
# Examples that run on the real server only (```python real-engine): the fake engine
# cannot constrain output, so it refuses tools.
REAL_ENGINE_ONLY = "real-engine"


@dataclass(frozen=True)
class Example:
    document: str
    line: int  # of the opening fence
    language: str  # bash (curl commands) or python
    command: str
    tags: tuple[str, ...]  # the fence's info string after the language

    @property
    def exclusion(self) -> str | None:
        """The EXCLUSIONS rule this example falls under, or None: it runs."""
        return next((tag for tag in self.tags if tag in EXCLUSIONS), None)

    def __str__(self) -> str:
        return f"{self.document}:{self.line}"


def is_example(language: str, command: str) -> bool:
    """A ```bash block with a `curl` command line, or a ```python block using DOC_URL."""
    if language == "python":
        return DOC_URL in command
    lines = [line.lstrip() for line in command.splitlines()]
    return language == "bash" and any(line.startswith("curl ") for line in lines)


def doc_examples() -> list[Example]:
    """Every example (see is_example) from every document, in order."""
    examples: list[Example] = []
    for name in DOCUMENTS:
        path = REPO_ROOT / name
        if not path.is_file():
            continue
        text = path.read_text()
        for match in FENCE.finditer(text):
            language, *tags = match.group(1).split() or [""]
            command = match.group(2).strip()
            if is_example(language, command):
                line = text.count("\n", 0, match.start()) + 1
                examples.append(Example(name, line, language, command, tuple(tags)))
    return examples


ALL_EXAMPLES = doc_examples()
EXAMPLES = [e for e in ALL_EXAMPLES if e.exclusion is None and e.language == "bash"]
PYTHON_EXAMPLES = [e for e in ALL_EXAMPLES if e.exclusion is None and e.language == "python"]


def check_output(output: str) -> None:
    """A JSON document, or server-sent events whose data lines are JSON or [DONE].

    Examples that print the response headers first (`curl -D -`) are checked after them.
    """
    if output.startswith("HTTP/"):
        headers, _, output = output.replace("\r\n", "\n").partition("\n\n")
        assert " 200" in headers.splitlines()[0], headers
    if output.startswith(("data:", ":")):
        data = [line[5:].strip() for line in output.splitlines() if line.startswith("data:")]
        assert data, output
        for item in data:
            if item != "[DONE]":
                assert "error" not in json.loads(item), item
    else:
        json.loads(output)


def test_every_curl_example_is_run_or_excluded_by_a_named_rule() -> None:
    known = {*EXCLUSIONS, REAL_ENGINE_ONLY}
    unknown = {str(e): e.tags for e in ALL_EXAMPLES if set(e.tags) - known}
    assert not unknown, f"fence tags not in EXCLUSIONS: {unknown}"
    counts = Counter(
        example.exclusion or ("python" if example.language == "python" else "curl")
        for example in ALL_EXAMPLES
    )
    assert dict(counts) == EXPECTED_COUNTS, [(str(e), e.exclusion) for e in ALL_EXAMPLES]


def test_the_examples_that_run_are_single_curl_commands_on_the_documented_port() -> None:
    for example in EXAMPLES:
        assert example.command.startswith("curl "), str(example)
        assert DOC_URL in example.command, str(example)


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_curl_example_runs(live_server: LiveServer, example: Example) -> None:
    command = example.command.replace(DOC_URL, live_server.url).replace(
        "curl", "curl --fail-with-body -sS", 1
    )
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{example}\n{example.command}\n{result.stdout}\n{result.stderr}"
    check_output(result.stdout)


@pytest.mark.parametrize(
    "example", PYTHON_EXAMPLES, ids=[f"python-{i}" for i in range(len(PYTHON_EXAMPLES))]
)
def test_python_example_runs(live_server: LiveServer, example: Example) -> None:
    """The script as printed, with the server's URL in place of the documented one; it
    must exit 0 and print what it was asked for (the fake engine's text, or the model's)."""
    if REAL_ENGINE_ONLY in example.tags and not live_server.is_real:
        pytest.skip("runs on the real server: the fake engine cannot constrain output")
    script = example.command.replace(DOC_URL, live_server.url)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{example}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), f"{example} printed nothing"
