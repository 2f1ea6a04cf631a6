"""Shared fixtures of the API tests: the demo checkpoint and real `tgserve serve` processes.

`ServerProcess` starts `python -m tgserve.api.cli serve` on a free port in its own session, with its
output in a file (never a pipe that could fill up), waits for /health, and stops it with SIGTERM,
falling back to SIGKILL of the whole process group.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

# Small limits keep start-up (warmup) and memory low; generation lengths in the tests fit them.
TEST_LIMIT_FLAGS = ("--max-input-tokens", "1024", "--max-total-tokens", "4096",
                    "--max-batch-prefill-tokens", "1024", "--max-batch-total-tokens", "32768")
# The tests' servers mean the CPU backend (`/info` says "cpu"); on a GPU host auto would pick cuda. They
# run in float32, the dtype of the oracle behind the exact texts tests expect (transformers' float32
# greedy output on the demo model, tests/core/test_demo_model.py); bfloat16 servers are checked
# against float32 transformers with a tolerance (test_smollm2_e2e.py).
TEST_SERVER_FLAGS = (*TEST_LIMIT_FLAGS, "--backend", "cpu", "--dtype", "float32")
HEALTH_TIMEOUT_S = 240.0  # model load + warmup on a busy 2-core CI box
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tgserve_command(*args: str) -> list[str]:
    """`python -m tgserve.api.cli ARGS` with this interpreter."""
    return [sys.executable, "-m", "tgserve.api.cli", *args]


class ServerProcess:
    """One `tgserve serve` process, its output in `log_path`."""

    def __init__(self, model_dir: Path | None, log_path: Path, *flags: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        model_flags = () if model_dir is None else ("--model-id", str(model_dir))
        command = tgserve_command("serve", *model_flags, "--hostname", "127.0.0.1", "--port", str(self.port), *flags)
        self._log_file = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        env={**tgserve_env(), **(env or {})},
                                        start_new_session=True)

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> "ServerProcess":
        """Block until GET /health answers 200; fail with the server's log if it dies or hangs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"server not healthy after {timeout_s}s:\n{self.log()[-4000:]}")

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait for the exit code; SIGKILL the whole process group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server's process group (it runs in its own session)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def tgserve_env() -> dict[str, str]:
    """This environment without the variables that would override the tests' flags."""
    return {k: v for k, v in os.environ.items() if k not in ("PORT", "HOSTNAME", "MODEL_ID", "BACKEND")}


@pytest.fixture(scope="session")
def model_dir(request: pytest.FixtureRequest) -> Path:
    """The demo checkpoint: the session-wide `demo_model_dir` fixture when the suite has one."""
    try:
        return Path(request.getfixturevalue("demo_model_dir"))
    except pytest.FixtureLookupError:
        from tgserve.checkpoints.demo_model import ensure_demo_model
        return ensure_demo_model()


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir: Path):
    """transformers' own tokenizer for the demo checkpoint: the independent source of expected ids and counts."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


@contextlib.contextmanager
def server_factory(tmp_path_factory: pytest.TempPathFactory, *base_flags: str) -> Iterator[Callable[..., ServerProcess]]:
    """`start(checkpoint, *flags, env=None)` starts a healthy server with `base_flags` and `flags`
    (checkpoint None: no --model-id); every server it started is stopped on exit."""
    started: list[ServerProcess] = []

    def start(checkpoint: Path | None, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(checkpoint, log_path, *base_flags, *flags, env=env)
        started.append(server)
        return server.wait_healthy()

    try:
        yield start
    finally:
        for server in started:
            server.terminate()


@pytest.fixture(scope="module")
def start_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start a healthy demo-model server with extra flags; every server it started is stopped at teardown.

    `with_model_id=False` leaves out --model-id, so the server picks its default model itself;
    `env` adds environment variables.
    """
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        def start_demo(*flags: str, with_model_id: bool = True, env: dict[str, str] | None = None) -> ServerProcess:
            return start(model_dir if with_model_id else None, *flags, env=env)

        yield start_demo


@pytest.fixture(scope="module")
def server(start_server) -> ServerProcess:
    """One default server per test module; a module that needs flags defines its own `server`."""
    return start_server()


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    """An httpx client on the module's server; modules using another client override this."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """Run `tgserve ARGS` to completion and return its result (text stdout / stderr); `env` adds variables."""

    def run(*args: str, timeout_s: float = 120.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(tgserve_command(*args), capture_output=True, text=True, timeout=timeout_s,
                              env={**tgserve_env(), **(env or {})})

    return run
