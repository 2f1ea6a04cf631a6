"""`tgserve.api.shared.tokens.simple_tokens` on the demo tokenizer: TGI's byte offsets and texts."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tgserve.api.shared.errors import ApiError
from tgserve.api.shared.tokens import _byte_starts, simple_tokens
from tgserve.core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


def test_ascii_tokens_cover_the_text(tokenizer):
    text = "Once upon a time, a fox."
    tokens = simple_tokens(tokenizer, text, add_special_tokens=True)
    assert [t["id"] for t in tokens] == tokenizer.encode(text)
    assert "".join(t["text"] for t in tokens) == text
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len(text)
    assert all(a["stop"] == b["start"] for a, b in zip(tokens, tokens[1:]))


def test_offsets_are_utf8_byte_offsets(tokenizer, hf_tokenizer):
    text = "é 你好 <|im_start|>x 😀"
    data = text.encode()
    tokens = simple_tokens(tokenizer, text, add_special_tokens=True)
    assert all(t["text"] == data[t["start"]:t["stop"]].decode(errors="replace") for t in tokens)
    assert tokens[0] == {"id": tokens[0]["id"], "text": "é", "start": 0, "stop": 2}
    start = data.index(b"<|im_start|>")
    im_start = hf_tokenizer.convert_tokens_to_ids("<|im_start|>")  # the id from transformers' tokenizer
    assert {"id": im_start, "text": "<|im_start|>", "start": start, "stop": start + 12} in tokens
    assert tokens[-1]["stop"] == len(data)


def test_truncate_keeps_the_last_tokens(tokenizer):
    tokens = simple_tokens(tokenizer, "one two three four", add_special_tokens=True)
    assert simple_tokens(tokenizer, "one two three four", add_special_tokens=True, truncate=2) == tokens[-2:]
    assert simple_tokens(tokenizer, "one", add_special_tokens=True, truncate=5) == tokens[:1]


def test_byte_starts():
    assert _byte_starts("aé😀") == [0, 1, 3, 7]
    assert _byte_starts("") == [0]


def test_slow_tokenizers_get_tgi_404():
    slow = SimpleNamespace(hf=SimpleNamespace(is_fast=False))
    with pytest.raises(ApiError) as missing:
        simple_tokens(slow, "x", add_special_tokens=True)  # type: ignore[arg-type]
    assert (missing.value.status_code, missing.value.error_type) == (404, "no fast tokenizer")
