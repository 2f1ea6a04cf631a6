"""The benchmark tests' real server: one demo-model `tgserve serve` shared by every module that needs one."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.api.conftest import TEST_SERVER_FLAGS, ServerProcess

PAYLOAD_LIMIT_BYTES = 65536  # small, so a request over it (413) costs little to send


@pytest.fixture(scope="package")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One demo-model server for the benchmark package (the serving CLI and the request clients)."""
    process = ServerProcess(demo_model_dir, tmp_path_factory.mktemp("server") / "server.log", *TEST_SERVER_FLAGS,
                            "--payload-limit", str(PAYLOAD_LIMIT_BYTES))
    try:
        yield process.wait_healthy()
    finally:
        process.terminate()
