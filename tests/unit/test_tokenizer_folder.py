"""A model folder that does not exist is named as such, never looked up on a model hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.tokenizer import Tokenizer


@pytest.mark.parametrize("name", ["no-such-folder", "some-org/some-model"])
def test_a_missing_model_folder_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative name, as LAMINA_MODEL may give it
    with pytest.raises(FileNotFoundError, match="run `lamina weights`.*LAMINA_MODEL"):
        Tokenizer(name)
