"""`tgserve serve --quantize bitsandbytes-nf4` over HTTP: greedy ids equal transformers' float32 ids on a copy
of the demo checkpoint whose decoder-layer linear weights (lm_head stays float) went through bitsandbytes' own CPU
quantize_4bit / dequantize_4bit (NF4, blocks of 64, float32 absmax), the oracle; /info and the log name
the method, bits and block size."""
from __future__ import annotations

import httpx
import pytest
import torch

from .quantized_oracle import assert_serves_like_transformers, dequantized_copy

functional = pytest.importorskip("bitsandbytes.functional", reason="needs the bitsandbytes package (the NF4 oracle)")


def nf4_round_trip(name: str, w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes on the flattened weight (what Params4bit stores): its CPU dequantize_4bit of a 2-D
    weight whose rows are not whole 64-blocks (down_proj's 352 inputs) reads blocks per row (0.50.2)."""
    if name.startswith("lm_head"):  # kept float at load, as transformers' bitsandbytes integration does
        return w
    packed, state = functional.quantize_4bit(w.reshape(-1), blocksize=64, quant_type="nf4", compress_statistics=False)
    return functional.dequantize_4bit(packed, state).reshape(w.shape)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--quantize", "bitsandbytes-nf4")


def test_nf4_greedy_ids_equal_transformers_on_bitsandbytes_dequantization(server, model_dir, hf_tokenizer,
                                                                          tmp_path_factory):
    reference_dir = dequantized_copy(model_dir, tmp_path_factory.mktemp("nf4") / "dequantized", nf4_round_trip)
    assert_serves_like_transformers(server.url, reference_dir, model_dir, hf_tokenizer)
    assert "weights quantized with bitsandbytes-nf4 4-bit, group size 64 (quantized at load, lm_head float)" in server.log()


def test_info_names_the_quantization(server):
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["quantization"] == {"method": "bitsandbytes-nf4", "bits": 4, "group_size": 64,
                                    "is_prequantized": False,
                                    "description": "bitsandbytes-nf4 4-bit, group size 64 (quantized at load, "
                                                   "lm_head float)"}
