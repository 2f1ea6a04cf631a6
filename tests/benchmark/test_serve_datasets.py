"""The serving benchmark's datasets: synthetic length distributions and prefixes, ShareGPT parsing."""
from __future__ import annotations

import json

import pytest

from tgserve.benchmark.datasets import (
    MAX_PROMPT_TOKENS,
    SampleRequest,
    count_tokens,
    first_exchange,
    is_valid_pair,
    random_dataset,
    sharegpt_dataset,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPECIAL_ID = 26
MERGED_ID = 27  # "ab" as one token, so decoding random ids and re-encoding can shorten them


class MergingTokenizer:
    """Letters a-z (ids 0-25), one special token (26) and a merge "ab" (27): text does not round-trip."""

    all_special_ids = [SPECIAL_ID]

    def __len__(self) -> int:
        return 28

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(MERGED_ID)
                i += 2
            else:
                ids.append(LETTERS.index(text[i]))
                i += 1
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join("ab" if i == MERGED_ID else "<s>" if i == SPECIAL_ID else LETTERS[i] for i in ids)


@pytest.mark.parametrize("tokenizer", [None, MergingTokenizer()], ids=["words", "tokenizer"])
def test_random_lengths_stay_within_the_range(tokenizer):
    samples = random_dataset(200, input_len=50, output_len=20, range_ratio=0.2, seed=0, tokenizer=tokenizer)
    assert len(samples) == 200
    input_lens = [sample.num_prompt_tokens for sample in samples]
    output_lens = [sample.num_output_tokens for sample in samples]
    assert min(input_lens) >= 40 and max(input_lens) <= 60
    assert min(output_lens) >= 16 and max(output_lens) <= 24
    assert len(set(input_lens)) > 5 and len(set(output_lens)) > 3  # they do vary
    for sample in samples:
        assert sample.num_prompt_tokens == count_tokens(sample.prompt, tokenizer)


def test_tokenizer_prompts_hit_their_target_length_and_avoid_special_tokens():
    tokenizer = MergingTokenizer()
    samples = random_dataset(50, input_len=64, output_len=8, range_ratio=0.0, seed=3, tokenizer=tokenizer)
    assert {sample.num_prompt_tokens for sample in samples} == {64}
    assert {sample.num_output_tokens for sample in samples} == {8}
    assert all(SPECIAL_ID not in tokenizer.encode(sample.prompt) for sample in samples)
    assert all("<s>" not in sample.prompt for sample in samples)


@pytest.mark.parametrize("tokenizer", [None, MergingTokenizer()], ids=["words", "tokenizer"])
def test_prefix_is_shared_and_counted(tokenizer):
    samples = random_dataset(10, input_len=30, output_len=5, prefix_len=16, seed=1, tokenizer=tokenizer)
    prefix = samples[0].prompt[:12]
    assert all(sample.prompt.startswith(prefix) for sample in samples)
    assert len({sample.prompt for sample in samples}) == 10
    assert all(sample.num_prompt_tokens == 46 for sample in samples)


def test_random_dataset_is_deterministic_by_seed():
    assert random_dataset(5, 20, 5, 0.5, seed=7) == random_dataset(5, 20, 5, 0.5, seed=7)
    assert random_dataset(5, 20, 5, 0.5, seed=7) != random_dataset(5, 20, 5, 0.5, seed=8)


def test_bad_range_ratio_raises():
    with pytest.raises(ValueError):
        random_dataset(3, 10, 10, range_ratio=1.0)


def conversation(*turns: tuple[str, str]) -> dict:
    return {"id": "x", "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_first_exchange_takes_the_first_human_turn_and_its_gpt_reply():
    assert first_exchange(conversation(("human", "hi"), ("gpt", "hello"), ("human", "more"))) == ("hi", "hello")
    assert first_exchange(conversation(("system", "be kind"), ("human", "q"), ("gpt", "a"))) == ("q", "a")
    assert first_exchange(conversation(("human", "q"))) is None
    assert first_exchange(conversation(("human", "q"), ("human", "q2"))) is None
    assert first_exchange({"conversations": []}) is None
    assert first_exchange({}) is None


def test_sharegpt_file(tmp_path):
    words = lambda n: " ".join(["word"] * n)  # noqa: E731 - one token per word without a tokenizer
    entries = [
        conversation(("human", words(10)), ("gpt", words(20))),
        conversation(("human", words(5)), ("gpt", words(7)), ("human", words(3)), ("gpt", words(2))),
        conversation(("human", words(2)), ("gpt", words(50))),  # prompt too short: skipped
        conversation(("human", words(8)), ("gpt", words(3))),  # reply too short: skipped
        conversation(("human", words(MAX_PROMPT_TOKENS + 1)), ("gpt", words(9))),  # prompt too long: skipped
        conversation(("human", words(12))),  # no reply: skipped
        {"id": "empty"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    samples = sharegpt_dataset(path, num_prompts=100, seed=0)
    assert sorted(samples, key=lambda s: s.num_prompt_tokens) == [
        SampleRequest(words(5), 5, 7), SampleRequest(words(10), 10, 20)]
    assert len(sharegpt_dataset(path, num_prompts=1, seed=0)) == 1
    fixed = sharegpt_dataset(path, num_prompts=100, seed=0, fixed_output_len=2)
    assert {sample.num_output_tokens for sample in fixed} == {2}
    assert len(fixed) == 3  # the too-short reply no longer matters with a fixed output length


def test_sharegpt_order_follows_the_seed(tmp_path):
    reply = "a reply of six words ok"
    entries = [conversation(("human", f"prompt number {i} here"), ("gpt", reply)) for i in range(20)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    first = [s.prompt for s in sharegpt_dataset(path, 20, seed=1)]
    assert first == [s.prompt for s in sharegpt_dataset(path, 20, seed=1)]
    assert first != [s.prompt for s in sharegpt_dataset(path, 20, seed=2)]
    assert sorted(first) == sorted(e["conversations"][0]["value"] for e in entries)


def test_is_valid_pair():
    assert is_valid_pair(4, 4)
    assert not is_valid_pair(3, 100)
    assert not is_valid_pair(100, 3)
    assert is_valid_pair(100, 3, is_output_len_fixed=True)
    assert not is_valid_pair(1000, 1049)
