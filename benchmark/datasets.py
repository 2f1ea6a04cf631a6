"""Prompts for the serving benchmark: a synthetic random dataset, or a ShareGPT JSON file.

With a tokenizer (`--tokenizer DIR`, a Hugging Face tokenizer folder such as the served checkpoint)
synthetic prompts are built from random token ids and their token counts are exact; without one
they are built from words, and a word counts as one token (an approximation). Servers that report
prompt token counts (TGI's stream details, OpenAI usage) override these counts in the results.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# vLLM's ShareGPT filter: pairs outside these token bounds are skipped.
MIN_SEQUENCE_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_SEQUENCE_TOKENS = 2048
NUM_FIT_ROUNDS = 4  # decode / re-encode rounds that bring a random prompt to its target length

_WORDS = tuple(
    "the of and to in is that it was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good new write our used me "
    "man too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away again off went old "
    "number great tell men say small every found still between name should home big give air line set own "
    "under read last never us left end along while might next sound below saw something thought both few "
    "those always looked show large often together asked house world going want school important until "
    "form food keep children feet land side without boy once animals life enough took sometimes four head "
    "above kind began almost live page got earth need far hand high year mother light parts country father".split())


class TextTokenizer(Protocol):
    """What the datasets need of a tokenizer (a transformers tokenizer satisfies it)."""

    all_special_ids: list[int]

    def __len__(self) -> int: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One prompt of the benchmark and how many tokens to ask for."""

    prompt: str
    num_prompt_tokens: int  # tokens in `prompt`: exact with a tokenizer, else its word count
    num_output_tokens: int  # max_new_tokens / max_tokens sent with the request


def load_tokenizer(path: str) -> TextTokenizer:
    """A Hugging Face tokenizer from a local folder (or hub id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def count_tokens(text: str, tokenizer: TextTokenizer | None) -> int:
    """Tokens in `text` (no special tokens added), or its whitespace word count without a tokenizer."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False))


def sample_lengths(mean_tokens: int, range_ratio: float, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """[num_samples] lengths drawn uniformly from [mean * (1 - r), mean * (1 + r)], each >= 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(mean_tokens * (1 - range_ratio)))
    high = max(low, int(mean_tokens * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=num_samples)


def random_dataset(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   prefix_len: int = 0, seed: int = 0,
                   tokenizer: TextTokenizer | None = None) -> list[SampleRequest]:
    """Synthetic prompts: a shared `prefix_len`-token prefix, then about `input_len` random tokens each.

    Input and output lengths vary uniformly by +-range_ratio around their means. Deterministic by seed.
    """
    rng = np.random.default_rng(seed)
    input_lens = sample_lengths(input_len, range_ratio, num_prompts, rng)
    output_lens = sample_lengths(output_len, range_ratio, num_prompts, rng)
    if tokenizer is None:
        prefix = list(rng.choice(_WORDS, size=prefix_len))
        prompts = [" ".join(prefix + list(rng.choice(_WORDS, size=int(n)))) for n in input_lens]
        counts = [prefix_len + int(n) for n in input_lens]
    else:
        special_ids = set(tokenizer.all_special_ids)
        vocab_ids = np.array([i for i in range(len(tokenizer)) if i not in special_ids])
        prefix_ids = list(rng.choice(vocab_ids, size=prefix_len))
        prompts, counts = [], []
        for n in input_lens:
            ids = prefix_ids + list(rng.choice(vocab_ids, size=int(n)))
            prompt, num_tokens = _fit_to_length(tokenizer, ids, prefix_len + int(n), vocab_ids, rng)
            prompts.append(prompt)
            counts.append(num_tokens)
    return [SampleRequest(prompt, count, int(out)) for prompt, count, out in zip(prompts, counts, output_lens)]


def _fit_to_length(tokenizer: TextTokenizer, ids: list[int], target_tokens: int, vocab_ids: np.ndarray,
                   rng: np.random.Generator) -> tuple[str, int]:
    """Text whose re-encoding is (nearly) `target_tokens` long: decoding random ids and encoding the
    text again merges or splits tokens, so trim or pad and retry a few times. Returns (text, count)."""
    text = tokenizer.decode([int(i) for i in ids])
    for _ in range(NUM_FIT_ROUNDS):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == target_tokens:
            break
        if len(encoded) > target_tokens:
            encoded = encoded[:target_tokens]
        else:
            encoded = encoded + [int(i) for i in rng.choice(vocab_ids, size=target_tokens - len(encoded))]
        text = tokenizer.decode(encoded)
    return text, count_tokens(text, tokenizer)


def first_exchange(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(first human turn, the gpt reply that follows it) of a ShareGPT entry, or None if it has none."""
    turns = entry.get("conversations") or []
    for i, turn in enumerate(turns[:-1]):
        if turn.get("from") == "human":
            reply = turns[i + 1]
            if reply.get("from") == "gpt":
                return str(turn.get("value", "")), str(reply.get("value", ""))
            return None
    return None


def is_valid_pair(num_prompt_tokens: int, num_output_tokens: int, is_output_len_fixed: bool = False) -> bool:
    """vLLM's ShareGPT filter: drop too-short prompts or replies and too-long prompts or sequences."""
    if num_prompt_tokens < MIN_SEQUENCE_TOKENS:
        return False
    if num_output_tokens < MIN_SEQUENCE_TOKENS and not is_output_len_fixed:
        return False
    return num_prompt_tokens <= MAX_PROMPT_TOKENS and num_prompt_tokens + num_output_tokens <= MAX_SEQUENCE_TOKENS


def sharegpt_dataset(path: str | Path, num_prompts: int, seed: int = 0, tokenizer: TextTokenizer | None = None,
                     fixed_output_len: int | None = None) -> list[SampleRequest]:
    """Up to `num_prompts` (prompt, reply length) pairs from a ShareGPT JSON file, shuffled by seed.

    The file is a list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]};
    the output length is the reply's token count unless `fixed_output_len` is given.
    """
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    pairs = [pair for pair in map(first_exchange, entries) if pair is not None]
    order = np.random.default_rng(seed).permutation(len(pairs))
    samples: list[SampleRequest] = []
    for index in order:
        prompt, reply = pairs[index]
        num_prompt_tokens = count_tokens(prompt, tokenizer)
        num_output_tokens = fixed_output_len or count_tokens(reply, tokenizer)
        if is_valid_pair(num_prompt_tokens, num_output_tokens, fixed_output_len is not None):
            samples.append(SampleRequest(prompt, num_prompt_tokens, num_output_tokens))
            if len(samples) == num_prompts:
                break
    return samples
