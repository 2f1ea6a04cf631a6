"""The benchmarks with quantized weights: `--quantize` reaches the engine, resident bytes are reported,
and the peers are told the weight width so llama.cpp runs Q8_0 / Q4_0 beside tgserve int8 / int4."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tgserve.api.cli import main
from tgserve.benchmark import compare, quantized_layers
from tgserve.benchmark.peers import registry

PEERS_DIR = Path(registry.__file__).parent


def test_engine_bench_runs_quantized_and_reports_resident_bytes(demo_model_dir, tmp_path):
    reports = {}
    for quantize in (None, "eetq"):
        path = tmp_path / f"{quantize}.json"
        flags = ["--quantize", quantize] if quantize else []
        assert main(["benchmark", "engine", "--model-id", str(demo_model_dir), "--dtype", "float32", *flags,
                     "--batch-size", "1", "--sequence-length", "4", "--decode-length", "2", "--runs", "1",
                     "--warmups", "0", "--bandwidth-probe-mb", "8", "--result-file", str(path)]) == 0
        reports[quantize] = json.loads(path.read_text())
    float_meta, int8_meta = reports[None]["meta"], reports["eetq"]["meta"]
    assert float_meta["quantization"] is None and int8_meta["quantization"]["method"] == "eetq"
    # int8 codes + one float32 scale per row against float32 weights: a little over a quarter.
    ratio = int8_meta["weight_bytes"]["linear_bytes"] / float_meta["weight_bytes"]["linear_bytes"]
    assert 0.25 < ratio < 0.30
    assert int8_meta["weight_bytes"]["total_bytes"] > int8_meta["weight_bytes"]["linear_bytes"]  # embeddings, norms
    # the roofline reads the packed bytes, not the checkpoint's
    assert reports["eetq"]["roofline"]["resident_weight_bytes"] == int8_meta["weight_bytes"]["total_bytes"]


@pytest.mark.parametrize("quantization, bits", [(None, 0), ({"method": "eetq", "bits": 8}, 8),
                                                ({"method": "gptq", "bits": 4}, 4), ({"method": "gptq", "bits": 3}, 4),
                                                ({"method": "fp8", "bits": 8}, 8), ({"method": "x", "bits": None}, 0)])
def test_weight_width_told_to_the_peers(quantization, bits):
    assert compare.quantized_bits(quantization) == bits


def test_quantized_run_passes_the_width_and_labels_the_columns(monkeypatch, tmp_path):
    """tgserve int8: the llama.cpp runner gets --weight-bits 8 (and --peer-model-id's float checkpoint) and
    its column names its GGUF type; a peer without a quantized mode gets a note that it ran float weights."""
    report = {"meta": {"model_dir": "/m", "dtype": "bfloat16", "device": "cpu", "torch_threads": 2, "backend": "cpu",
                       "quantization": {"method": "eetq", "bits": 8}},
              "results": [{"batch_size": 1, "decode": {"avg_ms": 10.0}, "prefill": {"p50_ms": 50.0},
                           "output_tokens_per_s": {"avg": 100.0}}], "roofline": None}
    monkeypatch.setattr(compare, "run_engine_bench", lambda config: report)
    seen = {}

    def fake_run_peer(spec, venvs_dir, args, timeout_s):
        seen[spec.name] = args
        settings = {"gguf_type": "q8_0"} if spec.name == "llamacpp" else {}
        return {"engine": spec.title, "is_available": True, "settings": settings,
                "metrics": {"decode_ms_per_token": 9.0, "ttft_ms": 40.0, "output_tokens_per_s": {}}}

    monkeypatch.setattr(registry, "run_peer", fake_run_peer)
    config = SimpleNamespace(batch_sizes=(1,), sequence_length=4, decode_length=2, runs=1, warmups=0, seed=0)
    monkeypatch.setattr(compare, "replace", lambda config, **changes: config)
    outcome = compare._run_round(config, ["transformers", "llamacpp"], tmp_path / "venvs", 10, threads=2,
                                 peer_model_dir=tmp_path / "float-source")
    engines = [r["engine"] for r in outcome["results"]]
    assert engines == ["tgserve (eetq)", "transformers", "llama.cpp (q8_0)"]
    for name in ("transformers", "llamacpp"):
        assert seen[name][seen[name].index("--weight-bits") + 1] == "8"
        assert seen[name][seen[name].index("--model-dir") + 1] == str(tmp_path / "float-source")  # --peer-model-id
    assert any("float weights" in note for note in outcome["results"][1]["notes"])
    assert not outcome["results"][2].get("notes")


class FakeLlamaCpp:
    """The slice of llama-cpp-python `ensure_quantized` calls; writes the output file it is asked for."""

    LLAMA_FTYPE_MOSTLY_Q8_0 = 7
    LLAMA_FTYPE_MOSTLY_Q4_0 = 2

    def __init__(self):
        self.calls = []

    def llama_model_quantize_default_params(self):
        return SimpleNamespace(ftype=None, nthread=0)

    def llama_model_quantize(self, source: bytes, out: bytes, params) -> int:
        self.calls.append((Path(source.decode()), Path(out.decode()), params.ftype))
        Path(out.decode()).write_bytes(b"GGUF")
        return 0


def test_llamacpp_runner_quantizes_with_llamas_own_api_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PEERS_DIR))  # the runner imports its siblings as top-level modules
    sys.modules.pop("llamacpp_runner", None)
    import llamacpp_runner

    source = tmp_path / "demo-abc123-bf16.gguf"
    source.write_bytes(b"GGUF")
    fake = FakeLlamaCpp()
    q8 = llamacpp_runner.ensure_quantized(fake, source, 8)
    q4 = llamacpp_runner.ensure_quantized(fake, source, 4)
    assert (q8.name, q4.name) == ("demo-abc123-bf16-q8_0.gguf", "demo-abc123-bf16-q4_0.gguf")
    assert [(c[0], c[2]) for c in fake.calls] == [(source, 7), (source, 2)]
    assert llamacpp_runner.ensure_quantized(fake, source, 8) == q8 and len(fake.calls) == 2  # cached
    assert not list(tmp_path.glob("*.partial"))


def test_layer_benchmark_prints_every_method(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(quantized_layers, "QWEN2_0_5B_SHAPES", ((256, 128),))
    path = tmp_path / "layers.json"
    assert quantized_layers.main(["--runs", "1", "--warmups", "0", "--result-file", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    methods = {row["method"] for row in rows}
    assert {"cpu-int8", "cpu-int4", "cpu-native-int8", "cpu-native-int4 g128", "cpu-native-int4 g32"} <= methods
    assert len(methods) == 6  # and the dense linear, the ratios' reference
    dense_bytes = next(r["weight_bytes"] for r in rows if r["method"].startswith("dense"))
    for int4 in ("cpu-int4", "cpu-native-int4 g128"):
        assert next(r["weight_bytes"] for r in rows if r["method"] == int4) <= 0.30 * dense_bytes
    assert all(row["vs_dense"] == 1.0 for row in rows if row["method"].startswith("dense"))
    assert "| [256 -> 128] | cpu-native-int8 | 8 |" in capsys.readouterr().out


def test_weight_bytes_count_each_storage_once():
    """A tied head (the embedding's storage seen twice) or a view costs its bytes once."""
    import torch

    from tgserve.benchmark.weight_bytes import reachable_tensors, tensor_bytes

    table = torch.zeros(10, 4, dtype=torch.bfloat16)
    prepared = (table, {"head": table[2:]}, None, 3)
    assert tensor_bytes(reachable_tensors(prepared)) == 10 * 4 * 2
    assert tensor_bytes([table, torch.zeros(3, dtype=torch.int8)]) == 83


def test_layer_benchmark_is_a_tgserve_benchmark_subcommand():
    import argparse

    from tgserve.benchmark import layers_cli
    from tgserve.benchmark.cli import add_benchmark_parser

    parser = argparse.ArgumentParser()
    add_benchmark_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["benchmark", "layers", "--threads", "2", "--batch-sizes", "1,8", "--dtype", "float32"])
    assert args.handler is layers_cli.run_layers_command
    assert (args.threads, args.batch_sizes, args.dtype, args.rounds) == (2, "1,8", "float32", 5)
