"""`tgserve` subcommand dispatch, in process (the real processes are in test_e2e_lifecycle.py)."""
from __future__ import annotations

import pytest

from tgserve.api import cli


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_demo_model_passes_its_arguments(monkeypatch, tmp_path, capsys):
    calls = []

    def write_demo_model(out_dir, shape=None, *, seed=0, progress=False):
        calls.append((out_dir, shape, seed))
        return tmp_path

    monkeypatch.setattr("tgserve.checkpoints.demo_model.write_demo_model", write_demo_model)
    assert cli.main(["demo-model", str(tmp_path), "--shape", "qwen2-7b", "--seed", "3"]) == 0
    assert calls == [(str(tmp_path), "qwen2-7b", 3)]
    assert capsys.readouterr().out.strip() == str(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["demo-model", str(tmp_path), "--shape", "gpt-5"])


def test_backends_table(capsys):
    assert cli.main(["backends"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["NAME", "USABLE", "PRIORITY"]
    assert any(row.split()[:2] == ["cpu", "yes"] for row in rows)


def test_bad_environment_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("MAX_BATCH_SIZE", "lots")
    assert cli.main(["serve"]) == 1
    assert capsys.readouterr().err == "tgserve: error: environment variable MAX_BATCH_SIZE='lots' is not a valid int\n"
