"""What start-up reads from a checkpoint, whatever its files: the raw config dict, the tokenizer, the weights.

A Hugging Face checkpoint keeps them in config.json, its tokenizer files and safetensors; a GGUF file
holds all three itself (`core/gguf_source.py`). `open_checkpoint` picks by the `ModelSource`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from tgserve.core.model_source import ModelSource
from tgserve.core.tokenizer import Tokenizer
from tgserve.core.weights import iter_weights


class Checkpoint(Protocol):
    """One checkpoint's contents, as start-up asks for them (once each)."""

    raw_config: dict  # config.json's fields (a GGUF file's metadata in that shape)

    def tokenizer(self, eos_token_ids: tuple[int, ...], trust_remote_code: bool = False) -> Tokenizer:
        """The checkpoint's tokenizer, stopping at `eos_token_ids` besides its own eos."""

    def iter_weights(self, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint tensor name, CPU tensor) pairs, each once, for `RunnableModel.load_weights`."""


@dataclass(slots=True, frozen=True)
class HfCheckpoint:
    """A Hugging Face checkpoint directory: config.json, tokenizer files, safetensors."""

    path: Path
    raw_config: dict

    def tokenizer(self, eos_token_ids: tuple[int, ...], trust_remote_code: bool = False) -> Tokenizer:
        return Tokenizer(self.path, eos_token_ids, trust_remote_code)

    def iter_weights(self, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_weights(self.path, progress=progress)


def open_checkpoint(source: ModelSource) -> Checkpoint:
    """The checkpoint at `source`: its GGUF file when it names one, else its directory."""
    if source.gguf_file is not None:
        from tgserve.core.gguf_source import GgufCheckpoint
        return GgufCheckpoint(source.gguf_file)
    return HfCheckpoint(source.path, json.loads((source.path / "config.json").read_text()))
