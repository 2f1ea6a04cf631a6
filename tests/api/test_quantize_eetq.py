"""`tgserve serve --quantize eetq` over HTTP: greedy token ids equal transformers' float32 greedy ids on
a copy of the demo checkpoint whose linear weights were quantized and dequantized here, independently of
tgserve (per output channel, absmax / 127, round half to even). TGI's names tgserve does not implement
are refused at start with one line naming what is supported."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from .quantized_oracle import assert_serves_like_transformers, dequantized_copy


def int8_round_trip(name: str, w: torch.Tensor) -> torch.Tensor:
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    return torch.round(w / scale).clamp(-127, 127) * scale


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--quantize", "eetq", "--dtype", "float32")


def test_eetq_greedy_ids_equal_transformers_on_the_dequantized_checkpoint(server, model_dir, hf_tokenizer,
                                                                         tmp_path_factory):
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is False  # lm_head is its own
    reference_dir = dequantized_copy(model_dir, tmp_path_factory.mktemp("eetq") / "dequantized", int8_round_trip)
    assert_serves_like_transformers(server.url, reference_dir, model_dir, hf_tokenizer)
    assert "weights quantized with eetq 8-bit, per output channel (quantized at load)" in server.log()
    # The cpu backend's native int8 GEMM is offered first, and takes every per-channel int8 weight.
    assert "weight-only kernels for torch.float32: cpu-native-int8, " in server.log()


def test_info_names_the_quantization(server):
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["quantization"] == {"method": "eetq", "bits": 8, "group_size": -1, "is_prequantized": False,
                                    "description": "eetq 8-bit, per output channel (quantized at load)"}


@pytest.mark.parametrize("method, expected", [
    ("exl2", "`--quantize exl2` is TGI's method tgserve does not implement; supported: "),
    ("nope", "invalid choice: 'nope'"),
])
def test_other_methods_are_refused_at_start_with_one_line(run_cli, method, expected):
    done = run_cli("serve", "--quantize", method, "--backend", "cpu", timeout_s=60)
    assert done.returncode != 0 and expected in done.stderr
    if method == "exl2":
        assert "eetq" in done.stderr.split("supported: ")[1]
