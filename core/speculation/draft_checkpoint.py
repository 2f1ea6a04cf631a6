"""`--speculative-model`: open the draft checkpoint and check that it speaks the target's vocabulary.

A draft's guesses are token ids the target verifies, so both models must give every id the same
meaning: the same number of embedding rows and the same tokenizer vocabulary (token text -> id,
added tokens included). Anything else is refused at start with a message that says which differs.
The weights load later through the same backend hooks as the target's (`engine_builder`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tgserve.core.checkpoint import Checkpoint, open_checkpoint
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.model_config import ModelConfig
from tgserve.core.model_source import resolve_model
from tgserve.core.tokenizer import Tokenizer


class DraftVocabularyMismatch(ConfigError):
    """The --speculative-model's vocabulary differs from the --model-id's."""


@dataclass(slots=True, frozen=True)
class DraftCheckpoint:
    """The draft checkpoint, checked, with the model config it is built from (host side, start-up)."""

    model_id: str  # --speculative-model as given
    checkpoint: Checkpoint
    # The draft's config; its rotary tables cover every position the target serves (the draft sees
    # the same sequences, its guesses past its trained length are only worse, never wrong).
    model_config: ModelConfig


def open_draft(config: ServerConfig, target: ModelConfig, target_tokenizer: Tokenizer) -> DraftCheckpoint:
    """Resolve `config.speculative_model` and check its vocabulary against the target's.

    Raises DraftVocabularyMismatch (a ConfigError) when the vocabulary sizes or the tokenizers' ids differ."""
    source = resolve_model(config.speculative_model, None, config.huggingface_hub_cache)
    checkpoint = open_checkpoint(source)
    draft = ModelConfig.from_dict(checkpoint.raw_config)
    what = f"`--speculative-model {config.speculative_model}`"
    if draft.vocab_size != target.vocab_size:
        raise DraftVocabularyMismatch(f"{what} has a vocabulary of {draft.vocab_size} ids, the model has "
                                      f"{target.vocab_size}: a draft must share the model's vocabulary")
    draft_tokenizer = checkpoint.tokenizer(draft.eos_token_ids, config.trust_remote_code)
    difference = vocabulary_difference(target_tokenizer, draft_tokenizer)
    if difference:
        raise DraftVocabularyMismatch(f"{what} has a different tokenizer vocabulary than the model ({difference}): "
                                      "a draft must share the model's vocabulary")
    return DraftCheckpoint(config.speculative_model, checkpoint,
                           dataclasses.replace(draft, max_sequence_tokens=target.num_rope_positions))


def vocabulary_difference(target: Tokenizer, draft: Tokenizer) -> str:
    """'' when both tokenizers map the same token texts to the same ids; else a short description."""
    target_vocab, draft_vocab = target.hf.get_vocab(), draft.hf.get_vocab()
    if len(target_vocab) != len(draft_vocab):
        return f"{len(draft_vocab)} tokens against {len(target_vocab)}"
    differing = [token for token, token_id in target_vocab.items() if draft_vocab.get(token) != token_id]
    if differing:
        example = differing[0]
        return (f"{len(differing)} tokens differ, e.g. {example!r} is id {draft_vocab.get(example)} in the draft, "
                f"{target_vocab[example]} in the model")
    return ""
