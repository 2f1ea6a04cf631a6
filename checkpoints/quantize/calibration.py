"""The calibration text of `tgserve quantize`: the user's own file (best: text like what they will serve)
or `builtin`, the English prose shipped in checkpoints/data: calibration_corpus.txt, then the demo model's
training text demo_corpus.txt (neither is the held-out text the quality benchmark scores), tokenized with
the checkpoint's tokenizer into equal windows.

The reference tools calibrate on far more: AutoAWQ 128 windows of 512 tokens of pile-val, AutoGPTQ's
examples 128 of 2048 of C4. On SmolLM2-135M, GPTQ 4-bit g128 act-order went from +28.6% perplexity with
calibration_corpus.txt alone (2,003 tokens: 3 windows, fewer tokens than down_proj has inputs, so its
Hessian was singular but for the dampening) to +25.4% with the demo corpus added (6,832 tokens, 13
windows; both measured with transformers in bf16 on the held-out text); the user's own text, as much
as they have, is better still.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tgserve.checkpoints.quantize.source import QuantizeRefused

BUILTIN = "builtin"
_DATA = Path(__file__).resolve().parent.parent / "data"
BUILTIN_PATHS = (_DATA / "calibration_corpus.txt", _DATA / "demo_corpus.txt")  # in this order, joined
# Fewer tokens than this and the Hessians / activation statistics of even a small model's layers
# (hundreds of input features) are dominated by a handful of sentences.
MIN_CALIBRATION_TOKENS = 512


@dataclass(slots=True, frozen=True)
class CalibrationSet:
    """The calibration token windows."""

    input_ids: torch.Tensor  # int64 [num_samples, seq_tokens]
    num_text_tokens: int  # tokens in the whole text (windows past max samples, and the tail, are dropped)
    source: str  # the file name, or "builtin"


def read_calibration_text(spec: str) -> tuple[str, str]:
    """(text, source name) for `--calibration` FILE or `builtin`."""
    if spec == BUILTIN:
        return "\n\n".join(path.read_text(encoding="utf-8").strip() for path in BUILTIN_PATHS), BUILTIN
    path = Path(spec)
    if not path.is_file():
        raise QuantizeRefused(f"calibration file {spec} does not exist (give a text file, or `builtin`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise QuantizeRefused(f"calibration file {spec} is not UTF-8 text ({error.reason})") from None
    return text, str(path)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The checkpoint's fast tokenizer (tokenizer.json); SentencePiece-only checkpoints through transformers."""
    if (model_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer


def calibration_windows(spec: str, model_dir: Path, *, seq_tokens: int, max_samples: int) -> CalibrationSet:
    """Tokenize the calibration text into at most max_samples windows of seq_tokens tokens.

    A text shorter than one window becomes one window of all its tokens. Raises QuantizeRefused
    when the text has fewer than MIN_CALIBRATION_TOKENS tokens.
    """
    text, source = read_calibration_text(spec)
    ids = load_tokenizer(model_dir).encode(text, add_special_tokens=False).ids
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise QuantizeRefused(f"the calibration text ({source}) has {len(ids)} tokens; tgserve quantize needs at "
                              f"least {MIN_CALIBRATION_TOKENS} (give more text, or `--calibration builtin`)")
    window = min(seq_tokens, len(ids))
    num_samples = min(max_samples, len(ids) // window)
    windows = torch.tensor(ids[:num_samples * window], dtype=torch.long).reshape(num_samples, window)
    return CalibrationSet(input_ids=windows, num_text_tokens=len(ids), source=source)
