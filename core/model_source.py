"""Where a checkpoint's files are: a local directory, a local GGUF file, or a snapshot in the Hugging Face hub cache.

Hub ids resolve through `huggingface_hub` with its cache layout (`models--org--name/snapshots/sha`),
so a model downloaded once by any HF tool is found offline. With HF_HUB_OFFLINE=1 nothing is
fetched and a model missing from the cache is a clear error. A `.gguf` file, or a directory without
config.json that holds exactly one, is served from that file alone (`core/gguf_source.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "vocab.json", "merges.txt"]


class ModelNotFound(RuntimeError):
    """The model id is neither a local checkpoint directory nor resolvable on the hub / in its cache."""


@dataclass(slots=True, frozen=True)
class ModelSource:
    model_id: str  # as the user gave it
    path: Path  # directory holding config.json, safetensors and tokenizer files (or the GGUF file)
    sha: str | None  # the hub commit, None for a local directory
    gguf_file: Path | None = None  # the GGUF file holding config, tokenizer and weights; None: a HF checkpoint


def resolve_model(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> ModelSource:
    """Find (downloading when allowed) the checkpoint `model_id` at `revision`."""
    local = Path(model_id).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(model_id, local.parent, None, gguf_file=local)
    if local.is_dir():
        if not (local / "config.json").is_file():
            return ModelSource(model_id, local, None, gguf_file=_only_gguf_file(local, model_id))
        return ModelSource(model_id, local, None)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        path = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=CHECKPOINT_FILES))
    except LocalEntryNotFoundError as error:
        raise ModelNotFound(f"model {model_id} (revision {revision or 'main'}) is not in the Hugging Face cache "
                            f"and cannot be downloaded (offline mode or no network): {error}") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise ModelNotFound(f"cannot fetch model {model_id} (revision {revision or 'main'}): {error}") from None
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"model {model_id} has no config.json")
    return ModelSource(model_id, path, path.name)


def _only_gguf_file(directory: Path, model_id: str) -> Path:
    """The one `.gguf` file of a directory that has no config.json."""
    files = sorted(directory.glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise ModelNotFound(f"{model_id} is a directory without config.json or a .gguf file")
    raise ModelNotFound(f"{model_id} holds several .gguf files ({', '.join(f.name for f in files)}): "
                        f"pass one of them as --model-id")
