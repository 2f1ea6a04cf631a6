"""The checkpoint's tokenizer, as the engine and the API use it (a thin layer over transformers)."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


class Tokenizer:
    """Encode, decode and chat templates for one checkpoint."""

    def __init__(self, model_dir: Path, eos_token_ids: tuple[int, ...] = (), trust_remote_code: bool = False,
                 gguf_file: str | None = None):
        """gguf_file: a GGUF file's name in `model_dir` whose metadata holds the tokenizer (transformers
        builds it); None: the directory's tokenizer files."""
        self.hf = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code,
                                                **({"gguf_file": gguf_file} if gguf_file else {}))
        eos = set(eos_token_ids)
        if self.hf.eos_token_id is not None:
            eos.add(self.hf.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))  # generation stops at any of these
        self.special_ids = frozenset(self.hf.all_special_ids) | frozenset(
            i for i, t in self.hf.added_tokens_decoder.items() if t.special)
        self.model_max_length = self.hf.model_max_length

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def id_to_text(self, token_id: int) -> str:
        """One token's text on its own (specials kept), as TGI reports top tokens and prefill tokens."""
        return self.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tools: list[dict] | None = None) -> str:
        """Render `messages` with the checkpoint's chat template to prompt text; `tools` (OpenAI's
        function definitions) reach the template as its `tools` variable."""
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, tools=tools)

    @property
    def is_tool_template(self) -> bool:
        """Whether the chat template reads a `tools` variable (else tools are described in the prompt)."""
        return self.chat_template is not None and "tools" in self.chat_template
