"""A vendor backend installed like `pip install tgserve-acme` serves, with no change to tgserve.

The `acme` plugin (`acme_plugin.py` beside this file) is written into a temporary directory as
package `acmeplug` plus `acmeplug-0.1.dist-info` declaring `acme = acmeplug.plugin` under
`tgserve.backends`, and only reaches the server through PYTHONPATH. It stands in for an accelerator
this machine lacks: it computes on the CPU. Its lifecycle hooks append JSON lines to $ACME_MARKER,
which is how the tests see that its own hooks ran inside the server process.

One real `tgserve serve --backend auto` process serves the module's tests; the shutdown test starts
and stops its own, with its own journal, so no test depends on running before or after another.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.api.conftest import TEST_LIMIT_FLAGS, ServerProcess, tgserve_command, tgserve_env

PLUGIN_SOURCE = Path(__file__).with_name("acme_plugin.py")
CORE_DEFAULT_BLOCK_SIZE = 16


def install_acme(root: Path) -> None:
    """Lay out `acmeplug` and its dist-info under `root`, as pip would in site-packages."""
    package = root / "acmeplug"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(PLUGIN_SOURCE, package / "plugin.py")
    dist_info = root / "acmeplug-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: acmeplug\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[tgserve.backends]\nacme = acmeplug.plugin\n")


def make_acme_env(root: Path) -> dict[str, str]:
    """The tests' environment plus PYTHONPATH with acme installed under `root` and ACME_MARKER set."""
    install_acme(root / "site-packages")
    env = tgserve_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "site-packages"), env.get("PYTHONPATH")]))
    env["ACME_MARKER"] = str(root / "acme-marker.jsonl")
    return env


@pytest.fixture(scope="module")
def acme_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The module server's environment (its journal is shared by the tests that use that server)."""
    return make_acme_env(tmp_path_factory.mktemp("acme-site"))


def hook_records(env: dict[str, str]) -> dict[str, list[dict]]:
    """The plugin's journal: hook name -> the records it wrote, in order."""
    marker = Path(env["ACME_MARKER"])
    records: dict[str, list[dict]] = {}
    lines = marker.read_text().splitlines() if marker.exists() else []
    for line in lines:
        record = json.loads(line)
        records.setdefault(record["hook"], []).append(record)
    return records


def start_acme_server(model_dir: Path, env: dict[str, str], log_path: Path) -> ServerProcess:
    """Start `tgserve serve --backend auto` where it can import acme (not yet healthy)."""
    with pytest.MonkeyPatch.context() as monkeypatch:  # ServerProcess passes os.environ on at Popen
        for name in ("PYTHONPATH", "ACME_MARKER"):
            monkeypatch.setenv(name, env[name])
        return ServerProcess(model_dir, log_path, *TEST_LIMIT_FLAGS, "--backend", "auto")


@pytest.fixture(scope="module")
def acme_server(demo_model_dir: Path, acme_env: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A healthy acme server shared by the module's tests; stopped at module teardown."""
    server = start_acme_server(demo_model_dir, acme_env, tmp_path_factory.mktemp("acme-server") / "server.log")
    try:
        yield server.wait_healthy()
    finally:
        server.terminate()


def test_backends_command_lists_acme_as_usable(acme_env):
    result = subprocess.run(tgserve_command("backends"), capture_output=True, text=True, timeout=120, env=acme_env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["acme"][1:3] == ["yes", "500"]
    assert "ACME test accelerator" in result.stdout
    # Sorted best first: acme outranks every usable built-in, cpu included.
    assert result.stdout.splitlines()[1].split()[0] == "acme"


def test_auto_selects_acme_over_cpu(acme_server, acme_env):
    assert "Backend: acme (ACME test accelerator)" in acme_server.log()
    info = httpx.get(f"{acme_server.url}/info", timeout=10).json()
    assert info["model_device_type"] == "cpu"
    assert info["model_dtype"] == "float32"  # the plugin's default dtype; no --dtype given
    startup = hook_records(acme_env)["tgserve_on_startup"]
    assert [record["pid"] for record in startup] == [acme_server.process.pid]
    assert startup[0]["backend"] == "auto"


def test_plugin_hooks_shaped_the_engine(acme_server, acme_env):
    (ready,) = hook_records(acme_env)["tgserve_on_model_ready"]
    assert ready["pid"] == acme_server.process.pid
    assert ready["block_size"] == 8 != CORE_DEFAULT_BLOCK_SIZE  # the plugin's hook beat the core default
    assert ready["max_total_tokens"] == 4096  # the limits the core derived from --max-total-tokens
    assert ready["num_applies"] > 0  # warmup already ran through the plugin's linear method
    assert "KV-cache blocks: %d, size: 8" % ready["num_blocks"] in acme_server.log()


def test_generate_returns_text_with_details(acme_server):
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 12, "details": True}}
    response = httpx.post(f"{acme_server.url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["generated_text"].strip()
    details = answer["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 12 == len(details["tokens"])


def test_sigterm_exits_cleanly_after_the_shutdown_hook(demo_model_dir, tmp_path):
    """A server of its own: stopping it leaves the module's shared server to the other tests."""
    env = make_acme_env(tmp_path)
    server = start_acme_server(demo_model_dir, env, tmp_path / "server.log")
    try:
        server.wait_healthy()
        body = {"inputs": "The cat", "parameters": {"max_new_tokens": 4}}
        assert httpx.post(f"{server.url}/generate", json=body, timeout=60).status_code == 200

        assert server.terminate() == 0, server.log()[-4000:]
    finally:
        server.terminate()  # a no-op once it exited; stops it if the test failed first

    records = hook_records(env)
    assert "tgserve_on_shutdown" in records, f"shutdown hook never ran; log:\n{server.log()[-4000:]}"
    (shutdown,) = records["tgserve_on_shutdown"]
    assert shutdown["pid"] == server.process.pid
    (ready,) = records["tgserve_on_model_ready"]
    assert shutdown["num_applies"] > ready["num_applies"]  # requests ran through the plugin's matmul
