"""A Medusa checkpoint as TGI finds one: a folder whose config.json names the heads and their base model.

TGI's `get_model` treats a `--model-id` whose config.json has `medusa_num_heads` as Medusa heads for
the model named by its `base_model_name_or_path` (a hub id or a local directory): the base model is
served from there, the heads come from `medusa_lm_head.safetensors` beside that config.json (the
FasterDecoding/Medusa training scripts write this folder). `--speculate` defaults to the head
count and may not exceed it. Each head is `medusa_num_layers` residual blocks
`x + SiLU(Linear(hidden, hidden)(x))` on the base model's final (normalized) hidden state, then its own
lm_head (tensors `{head}.{block}.linear.weight|bias`, `{head}.{num_layers}.weight`), or, without
that last tensor, the model's own lm_head (TGI's `MedusaHeadV2`). Head i guesses the token i + 2
places after the hidden state's position (the lm_head guesses the next one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tgserve.core.config import ConfigError

MEDUSA_HEADS_FILE = "medusa_lm_head.safetensors"
METHOD = "medusa"  # the method name TGI logs ("Using speculation medusa with N input ids.")


@dataclass(slots=True, frozen=True)
class MedusaCheckpoint:
    """Where a Medusa checkpoint's heads are and what they are (read once at start-up)."""

    path: Path  # the folder holding config.json and MEDUSA_HEADS_FILE
    num_heads: int  # medusa_num_heads: guesses per step at most
    num_layers: int  # medusa_num_layers: residual blocks per head
    base_model_id: str  # base_model_name_or_path, resolved against `path` when a folder there has the name

    @property
    def heads_file(self) -> Path:
        return self.path / MEDUSA_HEADS_FILE

    def speculate(self, requested: int | None) -> int:
        """Tokens proposed per step: `--speculate` when given (0 turns the heads off), else the head
        count; more than the heads can guess is TGI's start-up error, word for word."""
        if requested is None:
            return self.num_heads
        if requested > self.num_heads:
            raise ConfigError(f"Speculate is set to `{requested}` but this medusa models only has "
                              f"`{self.num_heads}` heads, please make them match")
        return requested


def find_medusa(path: Path, raw_config: dict) -> MedusaCheckpoint | None:
    """The Medusa checkpoint at `path` (whose config.json is `raw_config`); None for any other model.

    Raises ConfigError when the config names Medusa heads but the folder cannot serve them."""
    if "medusa_num_heads" not in raw_config:
        return None
    base = raw_config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}/config.json has medusa_num_heads but no base_model_name_or_path: "
                          "the heads need the model they were trained on")
    if not (path / MEDUSA_HEADS_FILE).is_file():
        raise ConfigError(f"{path} is a Medusa checkpoint (medusa_num_heads in config.json) "
                          f"without {MEDUSA_HEADS_FILE}")
    num_heads, num_layers = int(raw_config["medusa_num_heads"]), int(raw_config.get("medusa_num_layers", 1))
    if num_heads < 1 or num_layers < 1:
        raise ConfigError(f"{path}/config.json: medusa_num_heads and medusa_num_layers must be >= 1, "
                          f"got {num_heads} and {num_layers}")
    beside = path / base  # a relative name: a folder inside the Medusa folder first (tgserve), then as TGI
    return MedusaCheckpoint(path, num_heads, num_layers, str(beside) if (beside / "config.json").is_file() else base)


def read_medusa(path: Path) -> MedusaCheckpoint | None:
    """`find_medusa` for a local checkpoint directory (None where it has no config.json)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    return find_medusa(path, json.loads(config_file.read_text()))
