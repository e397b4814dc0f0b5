"""Every curl example in README.md runs against a live server,
so the documentation cannot drift from the API."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.api.conftest import LiveServer
from tests.server_process import REPO_ROOT

DOC_URL = "http://localhost:8000"
DOCUMENTS = ("README.md",)
BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def curl_examples() -> list[str]:
    """The ```bash blocks that start with `curl`, from every document, without repeats."""
    examples: list[str] = []
    for name in DOCUMENTS:
        path = REPO_ROOT / name
        if not path.is_file():
            continue
        for block in BASH_BLOCK.findall(path.read_text()):
            command = block.strip()
            if command.startswith("curl") and command not in examples:
                examples.append(command)
    return examples


EXAMPLES = curl_examples()


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


def test_the_docs_have_curl_examples() -> None:
    assert len(EXAMPLES) >= 5
    assert all(DOC_URL in example for example in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_curl_example_runs(live_server: LiveServer, example: str) -> None:
    command = example.replace(DOC_URL, live_server.url).replace(
        "curl", "curl --fail-with-body -sS", 1
    )
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{example}\n{result.stdout}\n{result.stderr}"
    check_output(result.stdout)
