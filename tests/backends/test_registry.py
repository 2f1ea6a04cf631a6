"""Backend discovery and selection through the `tgserve.backends` entry-point group.

Third-party plugins are installed for real, as a `*.dist-info` directory on sys.path, so they are
found exactly the way a vendor's `pip install tgserve-foo` would be.
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tgserve.core.layers.linear import LinearMethod
from tgserve.core.plugins import BackendRegistry, BackendUnavailable

BUILT_INS = {"cpu", "cuda", "rocm", "gaudi", "inferentia"}
ACCELERATORS = sorted(BUILT_INS - {"cpu"})

FAST_PLUGIN = '''
import torch
from tgserve.core.backend_status import BackendStatus
from tgserve.core.hookspecs import hookimpl

@hookimpl
def tgserve_get_backend_status():
    return BackendStatus(name="fast", is_usable=True, priority=1000, device_name="fast accelerator")

@hookimpl
def tgserve_get_device(rank):
    return torch.device("cpu")

@hookimpl
def tgserve_get_default_dtype():
    return "float32"

@hookimpl
def tgserve_get_free_memory_bytes(device):
    return 1 << 30

@hookimpl
def tgserve_get_dist_backend():
    return "fastlink"  # not cpu's "gloo": shows whose answer the registry returns

@hookimpl
def tgserve_synchronize(device):
    return True

@hookimpl
def tgserve_get_block_size():
    return 32
'''


def install_plugin(root: Path, package: str, entry_name: str, source: str, monkeypatch) -> None:
    """Write `package/plugin.py` and a dist-info declaring it under `tgserve.backends`, on sys.path."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "plugin.py").write_text(textwrap.dedent(source))
    dist_info = root / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[tgserve.backends]\n{entry_name} = {package}.plugin\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()


@pytest.fixture
def forget_plugin_modules():
    """Drop the temporary plugin packages from sys.modules after the test, so no state leaks."""
    yield
    for name in [name for name in sys.modules if name.split(".")[0] in ("brokenplug", "fastplug")]:
        del sys.modules[name]


def test_finds_all_built_in_backends():
    registry = BackendRegistry()
    assert BUILT_INS <= set(registry.plugins)
    assert not BUILT_INS & set(registry.failures)
    assert BUILT_INS <= {status.name for status in registry.statuses()}


def test_cpu_is_always_usable():
    statuses = {status.name: status for status in BackendRegistry().statuses()}
    assert statuses["cpu"].is_usable
    assert statuses["cpu"].priority == 0
    assert statuses["cpu"].device_name.startswith("cpu (")


@pytest.mark.parametrize("name", ACCELERATORS)
def test_absent_accelerator_says_why_and_how_to_install(name):
    status = next(s for s in BackendRegistry().statuses() if s.name == name)
    if status.is_usable:
        pytest.skip(f"this machine has a usable {name} device")
    assert status.reason
    assert status.install_hint.startswith(f"pip install tgserve[{name}]")
    assert status.priority > 0  # an accelerator beats the cpu under auto once it is usable


def test_cuda_status_follows_torch():
    status = next(s for s in BackendRegistry().statuses() if s.name == "cuda")
    assert status.is_usable == (torch.cuda.is_available() and torch.version.hip is None)


def test_auto_picks_cpu_without_accelerators():
    registry = BackendRegistry()
    usable = [s.name for s in registry.statuses() if s.is_usable]
    if usable != ["cpu"]:
        pytest.skip(f"accelerators usable here: {usable}")
    active = registry.select("auto")
    assert active.name == "cpu"
    assert active.hook.tgserve_get_device(rank=0) == torch.device("cpu")


def test_forcing_a_missing_backend_names_what_is_missing():
    registry = BackendRegistry()
    if next(s for s in registry.statuses() if s.name == "gaudi").is_usable:
        pytest.skip("this machine has a Gaudi")
    with pytest.raises(BackendUnavailable) as raised:
        registry.select("gaudi")
    message = str(raised.value)
    assert "habana_frameworks" in message
    assert "pip install tgserve[gaudi]" in message


def test_unknown_backend_lists_installed_ones():
    with pytest.raises(BackendUnavailable) as raised:
        BackendRegistry().select("tpu")
    message = str(raised.value)
    assert "'tpu'" in message
    for name in BUILT_INS:
        assert name in message


def test_broken_plugin_is_reported_but_does_not_stop_auto(tmp_path, monkeypatch, forget_plugin_modules):
    install_plugin(tmp_path, "brokenplug", "broken",
                   'raise ImportError("brokenplug needs libbroken.so, which is missing")\n', monkeypatch)
    registry = BackendRegistry()

    assert "broken" in registry.failures
    broken = next(s for s in registry.statuses() if s.name == "broken")
    assert not broken.is_usable and "libbroken.so" in broken.reason
    assert registry.select("auto").name in BUILT_INS
    with pytest.raises(BackendUnavailable, match="libbroken.so"):
        registry.select("broken")


def test_third_party_plugin_wins_auto_and_overrides_defaults(tmp_path, monkeypatch, forget_plugin_modules):
    install_plugin(tmp_path, "fastplug", "fast", FAST_PLUGIN, monkeypatch)
    registry = BackendRegistry()

    active = registry.select("auto")
    assert active.name == "fast"
    assert active.status.device_name == "fast accelerator"
    assert active.hook.tgserve_get_block_size() == 32  # its own hook beats the core default (16)
    # Hooks it leaves out fall to the core defaults, never to another backend (cpu's oneDNN method).
    method = active.hook.tgserve_make_linear_method(quantize=None, quantization=None, dtype=torch.float32, device=torch.device("cpu"))
    assert type(method) is LinearMethod
    assert active.hook.tgserve_get_dist_backend() == "fastlink"  # its own answer, not cpu's


def test_plugin_missing_a_required_hook_is_unusable_with_reason(tmp_path, monkeypatch, forget_plugin_modules):
    source = FAST_PLUGIN.replace("@hookimpl\ndef tgserve_get_free_memory_bytes(device):", "def unused(device):")
    install_plugin(tmp_path, "fastplug", "fast", source, monkeypatch)
    status = {s.name: s for s in BackendRegistry().statuses()}["fast"]
    assert not status.is_usable and "tgserve_get_free_memory_bytes" in status.reason


def test_misspelled_hook_rejects_only_that_plugin(tmp_path, monkeypatch, forget_plugin_modules):
    source = FAST_PLUGIN + "\n@hookimpl\ndef tgserve_get_blok_size():\n    return 8\n"
    install_plugin(tmp_path, "fastplug", "fast", source, monkeypatch)
    registry = BackendRegistry()
    assert "tgserve_get_blok_size" in registry.failures["fast"]
    assert registry.select("auto").name in BUILT_INS  # cpu here, cuda on a GPU host; never "fast"
