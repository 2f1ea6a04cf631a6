"""The GPU check (`benchmarks/gpu_check.sh`, `tgserve benchmark gpu-check`) works before any GPU arrives.

The whole script runs here on the CPU at toy sizes, as on the device but without the install; the
offline install it starts with on the device runs here into a folder of its own; its parts (parity
comparison, the random checkpoint writer, step time limits and the budget) are checked one by one.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tgserve.benchmark.gpu_check import STEPS, GpuCheckConfig, run_check, run_step
from tgserve.benchmark.gpu_check_steps import bench_summary
from tgserve.benchmark.parity import compare_greedy, cut_at_eos, first_mismatch
from tgserve.benchmark.random_checkpoint import write_random_qwen2

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
SOURCE_PACKAGES = ("tgserve", "core", "backends", "api", "benchmark", "checkpoints")  # pyproject's package-dir roots
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _script_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, **extra}


def test_cpu_run_of_the_script_passes_every_step(demo_model_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(out), "--demo-model", str(demo_model_dir),
                           "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600,
                          env=_script_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == [name for name, _ in STEPS]
    assert summary["passed"] and summary["meta"]["backend"] == "cpu" and summary["meta"]["is_small"]
    runs_kernels = importlib.util.find_spec("triton") is not None
    if runs_kernels:  # and its interpreter runs here (triton_weight_only.interpreter_problem)
        from tgserve.backends.cuda.triton_weight_only import interpreter_problem

        runs_kernels = interpreter_problem() is None
    assert {name for name, step in steps.items() if step["status"] == "passed"} == {
        "backends", "parity-demo", "serve-demo", "bench-qwen2-7b", *(["quant-kernels"] if runs_kernels else [])}
    assert steps["parity-smollm2"]["status"] == "skipped" and "--smollm2-dir" in steps["parity-smollm2"]["headline"]
    assert "cpu" in steps["backends"]["listing"] and steps["backends"]["machine"]["torch"] == torch.__version__

    parity = steps["parity-demo"]
    assert parity["float32_greedy"]["alone"] == {"is_equal": True, "mismatches": []}
    assert parity["float32_greedy"]["concurrent"] == {"is_equal": True, "mismatches": []}
    logprobs = parity["bf16_top_logprobs"]
    assert logprobs["is_close"] and [row["num_top_tokens"] for row in logprobs["prompts"]] == [5, 5]
    for row in logprobs["prompts"]:
        assert 0 <= row["max_abs_diff_nats"] <= row["transformers_bf16_max_abs_diff_nats"] + 0.1

    serve = steps["serve-demo"]
    assert serve["info"]["model_device_type"] == "cpu" and serve["generated_ids"] == serve["expected_ids"]

    bench = steps["bench-qwen2-7b"]
    assert set(bench["decode"]) == {"1", "2"} and bench["ttft_prompt_tokens"] == 16
    assert all(row["ms_per_token"] > 0 and row["floor_ms"] > 0 for row in bench["decode"].values())
    report = json.loads((out / "engine_bench.json").read_text())
    assert report["meta"]["shape"] == "tiny-qwen2" and report["meta"]["dtype"] == "bfloat16"
    assert "bench-qwen2-7b | passed" in done.stdout and "gpu check PASSED" in done.stdout

    kernels = steps["quant-kernels"]
    if not runs_kernels:
        assert kernels["status"] == "skipped" and "triton" in kernels["headline"]
    else:  # the tiny Qwen2's four fused linears x 2 row counts x (bf16, int8, int4), under Triton's interpreter
        assert len(kernels["rows"]) == 4 * 2 * 3 and set(kernels["layer_totals_ms"]) == {"1", "2"}
        assert {row["linear"] for row in kernels["rows"]} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
        quantized = [row for row in kernels["rows"] if row["kernel"] != "bf16"]
        assert all(row["max_rel_error"] <= 2e-2 and row["ms"] > 0 and row["config"]["block_m"] == 16
                   for row in quantized)
        assert "| qkv_proj | 64 -> 128 | 1 | int4 |" in kernels["table"] and "b2 per layer bf16" in kernels["headline"]
    assert sorted(path.name for path in out.iterdir()) == ["engine_bench.json", "gpu_check.json", "steps.log"]


def _copy_source_tree(dst: Path) -> Path:
    """What the device receives: the checkout without build outputs, caches, virtual environments (CI's own
    .venv-test inside the checkout is 2.6 GB, copied per test) and tests."""
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".whl*", ".gpu-models", "tests",
                                    "bench-results", ".pytest_cache", ".hypothesis", ".venv*", ".bench-venvs",
                                    ".benchmarks")
    return Path(shutil.copytree(REPO, dst, ignore=ignore))


def test_offline_install_of_the_tree_installs_every_module_and_the_backends(tmp_path):
    """The device's first command: no index, no build isolation (setuptools from the dev extra here)."""
    tree, site = _copy_source_tree(tmp_path / "tree"), tmp_path / "site"
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh"), "--install-only"], capture_output=True,
                          text=True, timeout=300, env=_script_env(TGSERVE_GPU_SITE=str(site)))
    assert done.returncode == 0, done.stderr[-3000:]
    source = {str(path.relative_to(tree / root).with_suffix("")).replace("/", ".")
              for root in SOURCE_PACKAGES for path in (tree / root).rglob("*.py")}
    installed = {str(path.relative_to(site / "tgserve" / root).with_suffix("")).replace("/", ".")
                 for root in SOURCE_PACKAGES[1:] for path in (site / "tgserve" / root).rglob("*.py")}
    installed |= {path.stem for path in (site / "tgserve").glob("*.py")}
    assert source - installed == set()  # a package missing from pyproject's list would be missing here
    (dist,) = importlib.metadata.distributions(path=[str(site)], name="tgserve")
    backends = {entry.name for entry in dist.entry_points if entry.group == "tgserve.backends"}
    assert {"cpu", "cuda"} <= backends and (site / "bin" / "tgserve").exists()


def test_stash_call_without_prepared_halves_fails_loudly(tmp_path):
    tree = _copy_source_tree(tmp_path / "tree")
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh"), "--stash"], capture_output=True,
                          text=True, timeout=60, env=_script_env())
    assert done.returncode == 1 and "gpu_prepare.sh" in done.stderr


def test_first_mismatch_and_eos_cut():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2, 3], [1, 2]) == 2
    assert cut_at_eos([4, 7, 9, 7], (7, 8)) == [4, 7]
    assert cut_at_eos([4, 5], (7,)) == [4, 5]
    result = compare_greedy([[1, 2], [3, 4, 5, 6, 7, 8]], [[1, 2], [3, 4, 0, 6, 7, 8]], (10, 20))
    assert result == {"is_equal": False,
                      "mismatches": [{"prompt_tokens": 20, "at": 2, "expected": [5, 6, 7, 8], "got": [0, 6, 7, 8]}]}


def test_random_checkpoint_loads_in_transformers_with_the_demo_tokenizer(demo_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = json.loads((demo_model_dir / "config.json").read_text())["vocab_size"]
    model_dir = write_random_qwen2(tmp_path / "tiny", {**TINY, "vocab_size": vocab}, demo_model_dir, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.config.hidden_size == 32 and model.config.vocab_size == vocab
    weights = dict(model.named_parameters())
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert weights["model.layers.1.mlp.up_proj.weight"].float().std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(weights["model.norm.weight"], torch.ones(32, dtype=torch.bfloat16))
    again = write_random_qwen2(tmp_path / "again", {**TINY, "vocab_size": vocab}, demo_model_dir, seed=3)
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert AutoTokenizer.from_pretrained(str(model_dir)).encode("The river") == \
        AutoTokenizer.from_pretrained(str(demo_model_dir)).encode("The river")


def _config(tmp_path: Path, **fields) -> GpuCheckConfig:
    return GpuCheckConfig(**{"backend": "cpu", "is_small": True, "out_dir": str(tmp_path / "out"),
                             "work_dir": str(tmp_path / "work"), "budget_s": 600.0, **fields})


def test_a_step_past_its_time_limit_is_killed_and_reported(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config_path = out / "config.json"
    config_path.write_text(json.dumps(asdict(_config(tmp_path))))
    step = run_step("backends", config_path, out, timeout_s=0.01)
    assert step["status"] == "failed" and step["headline"] == "timed out after 0 s"
    assert "===== backends" in (out / "steps.log").read_text()


def test_a_spent_budget_skips_every_step_and_says_so(tmp_path):
    summary = run_check(_config(tmp_path, budget_s=1.0))
    assert [step["status"] for step in summary["steps"]] == ["skipped"] * len(STEPS)
    assert all("budget is spent" in step["headline"] for step in summary["steps"])
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["passed"]


def test_unknown_step_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown step"):
        _config(tmp_path, steps=("backends", "warp-drive"))
    done = subprocess.run([sys.executable, "-m", "tgserve.api.cli", "benchmark", "gpu-check", "--steps", "nope",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "unknown step(s) nope" in done.stderr


def test_bench_summary_reads_decode_ttft_and_floor():
    row = lambda batch, ms: {"batch_size": batch, "prefill": {"p50_ms": 40.0 * batch},  # noqa: E731
                             "decode": {"avg_ms": ms, "floor_ms": 3.0, "fraction_of_floor": 3.0 / ms}}
    report = {"meta": {"shape": "qwen2-7b", "dtype": "bfloat16", "device_name": "NVIDIA H200", "sequence_length": 512,
                       "checkpoint_write_s": 9.0},
              "roofline": {"read_bytes_per_s": 4.3e12}, "results": [row(1, 6.0), row(32, 12.0)]}
    summary = bench_summary(report)
    assert summary["decode"] == {"1": {"ms_per_token": 6.0, "floor_ms": 3.0, "fraction_of_floor": 0.5},
                                 "32": {"ms_per_token": 12.0, "floor_ms": 3.0, "fraction_of_floor": 0.25}}
    assert summary["ttft_ms"] == 40.0 and summary["prefill_ms"] == {"1": 40.0, "32": 1280.0}
    assert "decode b32 12.00 ms/token (floor 3.00, 0.25 of it)" in summary["headline"]
    assert "4300 GB/s read" in summary["headline"]
