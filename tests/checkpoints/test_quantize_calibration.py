"""`tgserve quantize --calibration builtin`: the shipped prose, as many windows as it allows."""
from __future__ import annotations

from tgserve.checkpoints.heldout_text import read_heldout_text
from tgserve.checkpoints.quantize.calibration import BUILTIN_PATHS, calibration_windows, read_calibration_text


def test_builtin_is_both_shipped_texts_and_not_the_heldout_one():
    text, source = read_calibration_text("builtin")
    assert source == "builtin"
    calibration, demo = (path.read_text(encoding="utf-8").strip() for path in BUILTIN_PATHS)
    assert text.startswith(calibration) and text.endswith(demo)
    heldout = read_heldout_text()
    assert heldout[:200] not in text and text[:200] not in heldout


def test_builtin_gives_smollm2_thirteen_windows_of_512(smollm2_dir):
    """With calibration_corpus.txt alone SmolLM2 got 3 windows (1,536 tokens, as many as down_proj has
    inputs: a singular Hessian) and GPTQ 4-bit g128 act-order cost +28.6% perplexity; 13 windows gave
    +25.4% (calibration.py)."""
    windows = calibration_windows("builtin", smollm2_dir, seq_tokens=512, max_samples=64)
    assert windows.input_ids.shape == (13, 512)
    assert windows.num_text_tokens > 6500
