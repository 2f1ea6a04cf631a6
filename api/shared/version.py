"""The version every route reports (/info, OpenAI's `system_fingerprint`, the OpenAPI document)."""
from __future__ import annotations

import importlib.metadata


def server_version() -> str:
    """The installed tgserve version."""
    try:
        return importlib.metadata.version("tgserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"
