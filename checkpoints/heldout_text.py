"""The held-out English text `tgserve benchmark quality` scores (checkpoints/data/heldout_corpus.txt).

About 3,700 words of varied prose (stories, explanations, a dialogue, a memo) written for tgserve and
published nowhere else, so no model saw it in training. It is neither the demo model's training
corpus (demo_corpus.txt) nor calibration text for `tgserve quantize`: keep it out of both, or the
quality figures measure memorisation. The file opens with a header of "#" lines, which is not scored.
"""
from __future__ import annotations

from pathlib import Path

HELDOUT_PATH = Path(__file__).parent / "data" / "heldout_corpus.txt"


def read_heldout_text(path: str | Path | None = None) -> str:
    """The text to score: the file at `path` (default: the shipped held-out corpus) without its
    leading "#" header lines. Raises OSError when the file cannot be read, ValueError when it is empty."""
    lines = Path(path or HELDOUT_PATH).read_text(encoding="utf-8").splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    text = "".join(lines[start:]).strip()
    if not text:
        raise ValueError(f"{path or HELDOUT_PATH} holds no text to score")
    return text
