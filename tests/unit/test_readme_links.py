"""Every `](#anchor)` link in README.md reaches a heading, with GitHub's anchors: the
heading lowercased, punctuation but `-` and `_` dropped, spaces turned into `-`."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor() -> None:
    assert github_anchor("Against llama.cpp: `lamina bench peers`") == (
        "against-llamacpp-lamina-bench-peers"
    )
    assert github_anchor("Backpressure (429)") == "backpressure-429"


def test_every_internal_link_reaches_a_heading() -> None:
    text = README.read_text()
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", text), re.MULTILINE)
    anchors = [github_anchor(heading) for heading in headings]
    assert len(anchors) == len(set(anchors)), "two headings share an anchor"
    broken = sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - set(anchors))
    assert not broken, f"README.md links to headings that do not exist: {broken}"


def test_every_repository_path_the_readme_names_exists() -> None:
    """`docs/...`, `deploy/...`, `app/...` and `tests/...` in code spans name real files
    or folders (spans with a pattern, `{a,b}` or `*`, are left out)."""
    spans = re.findall(r"`((?:docs|deploy|app|tests)/[\w./-]+)`", README.read_text())
    missing = sorted({span for span in spans if not (README.parent / span).exists()})
    assert not missing, f"README.md names paths that do not exist: {missing}"
