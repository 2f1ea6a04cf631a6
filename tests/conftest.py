"""Session-wide fixtures shared by the whole test suite."""

from pathlib import Path

import pytest

from tgserve.core.demo_model import ensure_demo_model


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained demo checkpoint, built once per session into a temporary TGSERVE_CACHE.

    TGSERVE_CACHE stays set for the rest of the session, so code (and servers started as
    subprocesses) that calls `ensure_demo_model()` finds this copy instead of building another.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TGSERVE_CACHE", str(tmp_path_factory.mktemp("tgserve-cache")))
        yield ensure_demo_model()
