"""A small Qwen2-style byte-level BPE tokenizer, trained offline on the bundled demo corpus.

The pipeline (NFC normalizer, Qwen2's split regex, byte-level pre-tokenizer and decoder) is the
one transformers rebuilds for a `Qwen2Tokenizer`, so `AutoTokenizer` and
`tokenizers.Tokenizer.from_file` give the same ids. Special tokens and the ChatML chat template
match Qwen2-Instruct; their ids follow the trained vocabulary, as Qwen2's do.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

CORPUS_PATH = Path(__file__).parent / "data" / "demo_corpus.txt"

# Qwen2's pre-tokenizer split regex, verbatim.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order matters: Qwen2 numbers them endoftext, im_start, im_end after the BPE vocabulary.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2-Instruct's default ChatML template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_MODEL_LENGTH_TOKENS = 32768


def read_demo_corpus() -> str:
    """Return the bundled demo corpus (UTF-8 English prose with a few Chinese and emoji lines)."""
    return CORPUS_PATH.read_text(encoding="utf-8")


def build_demo_tokenizer(num_bpe_tokens: int = 2000) -> Tokenizer:
    """Train the demo tokenizer on the demo corpus; deterministic for a given corpus.

    num_bpe_tokens: target size of the BPE vocabulary (256 byte tokens plus merges); a small
        corpus may run out of merges first. The three special tokens come on top of it.
    Returns a `tokenizers.Tokenizer` with Qwen2's normalizer, pre-tokenizer and decoder.
    """
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=num_bpe_tokens,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(read_demo_corpus().splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render `messages` ({"role", "content"} dicts) with the ChatML template, as transformers does."""
    template = jinja2.Environment(keep_trailing_newline=True).from_string(CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Map each special token string to its id in `tokenizer`."""
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """Return tokenizer_config.json contents in Qwen2-Instruct's layout."""
    added_tokens_decoder = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, token_id in special_token_ids(tokenizer).items()
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": MAX_MODEL_LENGTH_TOKENS,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` as indented UTF-8 JSON, keys in the order given."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_demo_tokenizer(out_dir: Path, tokenizer: Tokenizer) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(tokenizer))
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
