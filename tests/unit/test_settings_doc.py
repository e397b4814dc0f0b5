"""README.md's table of `LAMINA_*` settings is the one `app.settings_doc` renders from
`Settings`, so adding, removing or changing a setting without regenerating the table
fails here, with the command that fixes it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field, create_model

from app import settings_doc
from app.config import ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[2] / "README.md"
HOW_TO_FIX = f"README.md's settings table is out of date: run `{settings_doc.REGENERATE}`"


def readme_table() -> str:
    text = README.read_text()
    start, end = text.find(settings_doc.BEGIN), text.find(settings_doc.END)
    assert 0 <= start < end, (
        f"README.md lacks the markers {settings_doc.BEGIN!r} / {settings_doc.END!r}"
    )
    return text[start + len(settings_doc.BEGIN) : end].strip()


def test_the_readme_table_is_the_generated_one() -> None:
    assert readme_table() == settings_doc.settings_table(), HOW_TO_FIX


def test_every_setting_has_one_row_with_a_description() -> None:
    rows = [line for line in readme_table().splitlines() if line.startswith("| `LAMINA_")]
    names = [re.match(r"\| `(LAMINA_\w+)`", row).group(1) for row in rows]
    assert names == [ENV_PREFIX + name.upper() for name in Settings.model_fields], HOW_TO_FIX
    assert all(info.description for info in Settings.model_fields.values())
    for row in rows:
        assert len(re.split(r"(?<!\\)\|", row)) == 6, row  # 4 cells, none split by a stray |


def test_values_and_defaults_read_as_the_environment_takes_them() -> None:
    fields = Settings.model_fields
    assert settings_doc.values_of(fields["device"]) == "`auto` \\| `cpu` \\| `cuda`"
    assert settings_doc.values_of(fields["port"]) == "integer ≥ 0, ≤ 65535"
    assert settings_doc.values_of(fields["request_timeout_s"]) == "number > 0 or unset"
    assert settings_doc.default_of(fields["open_routes"]) == "`/health,/ready,/metrics`"
    assert settings_doc.default_of(fields["api_keys"]) == "empty"
    assert settings_doc.default_of(fields["native_kernels"]) == "`true`"
    assert settings_doc.default_of(fields["model"]) == "`model_weights/smollm2-135m-instruct`"


def test_a_field_without_a_description_or_an_unknown_type_is_refused(monkeypatch) -> None:
    bare = create_model("Bare", undocumented=(int, 3))
    monkeypatch.setattr(settings_doc, "Settings", bare)
    with pytest.raises(ValueError, match="undocumented has no description"):
        settings_doc.settings_table()
    odd = create_model("Odd", mapping=(dict, Field(default_factory=dict, description="x")))
    with pytest.raises(TypeError, match="no wording"):
        settings_doc.values_of(odd.model_fields["mapping"])


def test_write_and_check_round_trip(tmp_path: Path) -> None:
    document = tmp_path / "DOC.md"
    document.write_text(f"intro\n{settings_doc.BEGIN}\nstale\n{settings_doc.END}\noutro\n")
    assert settings_doc.main(["--check", str(document)]) == 1
    assert settings_doc.main(["--write", str(document)]) == 0
    assert settings_doc.main(["--check", str(document)]) == 0
    text = document.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{settings_doc.END}\noutro\n")
    assert settings_doc.settings_table() in text


def test_a_document_without_markers_is_refused(tmp_path: Path) -> None:
    document = tmp_path / "DOC.md"
    document.write_text("no markers here\n")
    with pytest.raises(settings_doc.MarkersMissing):
        settings_doc.main(["--write", str(document)])


def test_defaults_quoted_in_the_readmes_prose_are_the_settings() -> None:
    """`LAMINA_X` (N) or (default N) outside the table says N is X's default: it must be."""
    text = README.read_text()
    quoted = re.findall(r"`LAMINA_([A-Z_]+)`\s*\((?:default\s*)?(\d[\d.,]*)", text)
    assert quoted, "the pattern no longer finds the README's quoted defaults"
    for name, value in quoted:
        field = Settings.model_fields[name.lower()]
        assert float(value.rstrip(".,").replace(",", "")) == float(field.default), (name, value)
