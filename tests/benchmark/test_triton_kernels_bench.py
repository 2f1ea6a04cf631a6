"""The quant-kernels step's shapes, totals, table and verdict (its whole run on the CPU is in test_gpu_check.py)."""
from __future__ import annotations

import torch

from tgserve.benchmark import triton_kernels_bench as bench
from tgserve.checkpoints.demo_model import SHAPES


def test_qwen2_7b_linears_as_tgserve_fuses_them():
    assert bench.decoder_linears(SHAPES["qwen2-7b"]) == (
        ("qkv_proj", 3584, 3584 + 2 * 4 * 128), ("o_proj", 3584, 3584), ("gate_up_proj", 3584, 2 * 18944),
        ("down_proj", 18944, 3584))


def _rows(int4_error: float = 1e-3) -> list[dict]:
    rows = []
    for linear, ms in (("qkv_proj", 1.0), ("down_proj", 3.0)):
        rows.append(bench._row(linear, 3584, 4608, 1, "bf16", ms, 4608 * 3584 * 2))
        rows.append({**bench._row(linear, 3584, 4608, 1, "int4", ms / 4, 4608 * 3584 // 2),
                     "speedup_vs_bf16": 4.0, "max_rel_error": int4_error})
    return rows


def test_layer_totals_headline_and_table():
    rows = _rows()
    assert bench.layer_totals(rows) == {"1": {"bf16": 4.0, "int4": 1.0}}
    assert bench.is_correct(rows)
    line = bench.headline(rows, "qwen2-7b", "NVIDIA H200")
    assert line.startswith("qwen2-7b linears on NVIDIA H200; b1 per layer bf16 4.000 ms, int4 1.000 (4.00x)")
    assert line.endswith("max rel error 1.0e-03 (within 0.02)")
    table = bench.format_table(rows)
    assert "| down_proj | 3584 -> 4608 | 1 | int4 | 0.7500 | 11 | 4.00x | 1.0e-03 |" in table
    assert rows[0]["weight_gb_per_s"] == 4608 * 3584 * 2 / 1.0 / 1e6


def test_a_kernel_off_the_reference_fails_the_step():
    rows = _rows(int4_error=0.5)
    assert not bench.is_correct(rows) and "NOT within" in bench.headline(rows, "qwen2-7b", "x")


def test_random_affine_weight_is_asymmetric_in_range():
    weight = bench.random_affine(16, 256, 4, 128, "cpu", torch.Generator().manual_seed(0))
    assert weight.q.dtype == torch.uint8 and int(weight.q.max()) <= 15 and weight.scales.shape == (16, 2)
    assert torch.equal(weight.scales, weight.scales.half().float()) and len(weight.zeros.unique()) > 1
