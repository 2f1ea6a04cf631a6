"""Draft checkpoints for the speculation tests, made from the demo checkpoint (test helper).

`write_truncated_draft` (tgserve.checkpoints.truncated_draft): the first layers only (same tokenizer,
embeddings and head): a cheaper model whose guesses are often, not always, the target's, so
verification both accepts and rejects. `write_relabelled_tokenizer`: the demo checkpoint with two
tokens' ids swapped in its tokenizer, the same vocabulary size: a draft whose ids mean other tokens.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tgserve.checkpoints.truncated_draft import write_truncated_draft

__all__ = ["write_relabelled_tokenizer", "write_truncated_draft"]


def write_relabelled_tokenizer(target_dir: Path, out_dir: Path) -> tuple[str, str]:
    """A copy of `target_dir` whose tokenizer swaps the ids of two ordinary tokens; returns the two tokens."""
    shutil.copytree(target_dir, out_dir)
    path = out_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(tokenizer))
    return first, second
