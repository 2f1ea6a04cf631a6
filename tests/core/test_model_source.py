"""resolve_model: local directories, and hub ids found offline in a Hugging Face cache layout.

The cache is built by hand as huggingface_hub lays it out:
    <cache>/models--acme--tiny/refs/main            -> "<sha>"
    <cache>/models--acme--tiny/snapshots/<sha>/...  -> the checkpoint files
"""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest

from tgserve.core.model_source import ModelNotFound, ModelSource, resolve_model

_SHA = "0123456789abcdef0123456789abcdef01234567"
_OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as a user sets it. huggingface_hub reads the variable when it is imported,
    so the already-imported module's flag is set too; nothing may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _snapshot(cache: Path, repo: str, sha: str, files: dict[str, str], ref: str | None = "main") -> Path:
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    if ref is not None:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(sha)  # huggingface_hub writes the sha without a newline
    return snapshot


_CHECKPOINT = {"config.json": json.dumps({"model_type": "qwen2"}), "tokenizer.json": "{}"}


def test_hub_id_resolves_offline_from_cache(tmp_path, offline):
    snapshot = _snapshot(tmp_path, "acme/tiny", _SHA, _CHECKPOINT)
    source = resolve_model("acme/tiny", cache_dir=str(tmp_path))
    assert source == ModelSource("acme/tiny", snapshot, _SHA)
    assert (source.path / "config.json").is_file() and (source.path / "tokenizer.json").is_file()


def test_revision_by_commit_sha(tmp_path, offline):
    _snapshot(tmp_path, "acme/tiny", _SHA, _CHECKPOINT)
    older = _snapshot(tmp_path, "acme/tiny", _OTHER_SHA, _CHECKPOINT, ref=None)
    source = resolve_model("acme/tiny", revision=_OTHER_SHA, cache_dir=str(tmp_path))
    assert (source.path, source.sha) == (older, _OTHER_SHA)


def test_revision_by_branch_name(tmp_path, offline):
    _snapshot(tmp_path, "acme/tiny", _SHA, _CHECKPOINT)
    dev = _snapshot(tmp_path, "acme/tiny", _OTHER_SHA, _CHECKPOINT, ref="dev")
    assert resolve_model("acme/tiny", revision="dev", cache_dir=str(tmp_path)).path == dev


def test_model_missing_from_cache(tmp_path, offline):
    _snapshot(tmp_path, "acme/tiny", _SHA, _CHECKPOINT)
    with pytest.raises(ModelNotFound, match=r"acme/other.*not in the Hugging Face cache.*offline"):
        resolve_model("acme/other", cache_dir=str(tmp_path))


def test_revision_missing_from_cache(tmp_path, offline):
    _snapshot(tmp_path, "acme/tiny", _SHA, _CHECKPOINT)
    with pytest.raises(ModelNotFound, match=r"revision v2.*not in the Hugging Face cache"):
        resolve_model("acme/tiny", revision="v2", cache_dir=str(tmp_path))
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache"):
        resolve_model("acme/tiny", revision=_OTHER_SHA, cache_dir=str(tmp_path))


def test_cached_snapshot_without_config_is_refused(tmp_path, offline):
    _snapshot(tmp_path, "acme/tiny", _SHA, {"tokenizer.json": "{}"})
    with pytest.raises(ModelNotFound, match="acme/tiny has no config.json"):
        resolve_model("acme/tiny", cache_dir=str(tmp_path))


def test_local_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model(str(tmp_path))
    assert source == ModelSource(str(tmp_path), tmp_path, None)


def test_local_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFound, match="is a directory without config.json"):
        resolve_model(str(tmp_path))


def test_invalid_id_is_model_not_found(tmp_path, offline):
    with pytest.raises(ModelNotFound):
        resolve_model(str(tmp_path / "no" / "such" / "dir"), cache_dir=str(tmp_path))
