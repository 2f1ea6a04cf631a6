"""The roofline arithmetic: which bytes a decode step reads, the floor, the fraction; the bandwidth probe runs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from tgserve.benchmark import roofline

# A toy checkpoint: vocab 10, hidden 4, one layer of two linears and a norm.
NUMELS = {"model.embed_tokens.weight": 40, "model.layers.0.mlp.up_proj.weight": 32,
          "model.layers.0.mlp.down_proj.weight": 32, "model.norm.weight": 4}


def test_tied_head_is_resident_twice_but_read_once():
    weights = roofline.weight_bytes(NUMELS, itemsize=2, tie_word_embeddings=True)
    assert weights.checkpoint_bytes == 108 * 2
    assert weights.is_tied and weights.embedding_bytes == weights.lm_head_bytes == 80
    assert weights.resident_weight_bytes == 108 * 2 + 80
    # The step streams the packed head (80) and every other weight (136), not the embedding table.
    assert weights.decode_weight_bytes == 136 + 80 == weights.checkpoint_bytes


def test_untied_embedding_table_is_gathered_not_streamed():
    numels = {**NUMELS, "lm_head.weight": 40}
    weights = roofline.weight_bytes(numels, itemsize=4, tie_word_embeddings=False)
    assert not weights.is_tied
    assert weights.checkpoint_bytes == 148 * 4
    assert weights.resident_weight_bytes == weights.checkpoint_bytes
    assert weights.lm_head_bytes == 160
    assert weights.decode_weight_bytes == (148 - 40) * 4


def test_a_checkpoint_with_its_own_head_is_untied_whatever_the_config_says():
    weights = roofline.weight_bytes({**NUMELS, "lm_head.weight": 40}, itemsize=2, tie_word_embeddings=True)
    assert not weights.is_tied and weights.resident_weight_bytes == weights.checkpoint_bytes


def test_decode_step_bytes_add_kv_and_embedding_rows_per_sequence():
    weights = roofline.weight_bytes(NUMELS, itemsize=2, tie_word_embeddings=True)
    one = roofline.decode_step_bytes(weights, 1, mean_context_tokens=100, kv_bytes_per_token=12, embedding_row_bytes=8)
    eight = roofline.decode_step_bytes(weights, 8, mean_context_tokens=100, kv_bytes_per_token=12, embedding_row_bytes=8)
    assert one == 216 + 1208
    assert eight - one == 7 * 1208  # the weights are read once per step, whatever the batch


def test_floor_and_fraction():
    assert roofline.floor_ms(1e9, 50e9) == pytest.approx(20.0)
    assert roofline.fraction_of_floor(20.0, 25.0) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        roofline.floor_ms(1e9, 0)
    with pytest.raises(ValueError):
        roofline.fraction_of_floor(20.0, 0)


def test_qwen2_half_b_shape_floor():
    """Qwen2-0.5B in bf16 (tied): 494 M parameters -> 988 MB read per step, 24.7 ms at 40 GB/s."""
    numels = {"model.embed_tokens.weight": 151936 * 896, "rest": 494_032_768 - 151936 * 896}
    weights = roofline.weight_bytes(numels, itemsize=2, tie_word_embeddings=True)
    assert weights.decode_weight_bytes == 988_065_536
    assert weights.resident_weight_bytes - weights.checkpoint_bytes == 272_269_312
    assert roofline.floor_ms(weights.decode_weight_bytes, 40e9) == pytest.approx(24.70, abs=0.01)


def test_safetensors_numels_reads_headers(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4), "model.norm.weight": torch.zeros(4, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    assert roofline.safetensors_numels(tmp_path) == {"model.embed_tokens.weight": 40, "model.norm.weight": 4}


def test_summary_has_every_field():
    weights = roofline.weight_bytes(NUMELS, itemsize=2, tie_word_embeddings=True)
    summary = roofline.roofline_summary(weights, kv_bytes_per_token=12, embedding_row_bytes=8,
                                        bandwidth_bytes_per_s=1e9, context_tokens=10)
    assert summary["batch1_decode_bytes"] == 216 + 10 * 12 + 8
    assert summary["batch1_floor_ms"] == pytest.approx(summary["batch1_decode_bytes"] / 1e6)
    for key in ("checkpoint_bytes", "resident_weight_bytes", "decode_weight_bytes", "is_tied", "read_bytes_per_s"):
        assert key in summary


class _ScriptedSums(TorchFunctionMode):
    """Logs every torch call of the probe and advances a fake clock by a scripted time per `sum`,
    so the probe's arithmetic can be checked exactly: only a sum inside a timed window adds time."""

    def __init__(self, sum_durations_s: list[float]):
        super().__init__()
        self.now_s = 0.0
        self.durations_s = list(sum_durations_s)
        self.log: list[tuple] = []

    def perf_counter(self) -> float:
        self.log.append(("clock",))
        return self.now_s

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if name == "sum":
            self.now_s += self.durations_s.pop(0)
            self.log.append(("sum", args[0].numel(), args[0].dtype))
        elif name == "ones":
            self.log.append(("ones", result.numel(), result.dtype))
        return result


def test_bandwidth_probe_is_bytes_over_the_best_timed_full_read(monkeypatch):
    """Oracle: the docstring's arithmetic by hand. A fake clock advances only while a sum runs
    (warm-up 0.125 s, then 0.5, 0.25, 0.375 s: exact in binary), so the probe must time each repeat's
    sum alone, skip the warm-up, read the whole num_bytes every time, and report num_bytes / 0.25 s
    (the best repeat; the median would be 0.375 s, the mean 0.375 s)."""
    num_bytes, durations_s = 4 << 20, [0.125, 0.5, 0.25, 0.375]
    sums = _ScriptedSums(durations_s)
    monkeypatch.setattr(roofline, "time", SimpleNamespace(perf_counter=sums.perf_counter))
    with sums:
        probe = roofline.measure_read_bandwidth(num_bytes=num_bytes, repeats=3)
    numel = num_bytes // 4
    assert sums.log == [("ones", numel, torch.float32), ("sum", numel, torch.float32),  # untimed warm-up
                        *[("clock",), ("sum", numel, torch.float32), ("clock",)] * 3]
    assert probe["read_bytes_per_s"] == num_bytes / 0.25
    assert (probe["num_bytes"], probe["repeats"], probe["device"]) == (num_bytes, 3, "cpu")
    assert probe["num_threads"] == torch.get_num_threads()


def test_bandwidth_probe_runs_on_the_real_clock():
    probe = roofline.measure_read_bandwidth(num_bytes=4 << 20, repeats=2)
    assert probe["read_bytes_per_s"] > 0 and probe["num_bytes"] == 4 << 20
    assert probe["num_threads"] == torch.get_num_threads() and probe["device"] == "cpu"
