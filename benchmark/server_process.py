"""`tgserve serve` as a child process: started on a free port, polled until healthy, stopped with SIGTERM.

The server runs in a session of its own with its output in a file (never a pipe that could fill
up), so a hung server and anything it started can be killed as a group.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HEALTH_POLL_S = 0.25
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One `python -m tgserve.api.cli serve FLAGS` on 127.0.0.1, its output in `log_path`."""

    def __init__(self, flags: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        command = [sys.executable, "-m", "tgserve.api.cli", "serve", *flags,
                   "--hostname", "127.0.0.1", "--port", str(self.port), "--prometheus-port", "0"]
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOSTNAME", "MODEL_ID", "BACKEND")}
        self._log_file = open(self.log_path, "wb")
        self.started_s = time.monotonic()
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def wait_healthy(self, timeout_s: float) -> float:
        """Poll GET /health until 200; seconds from start to healthy. Raises with the log if it dies or hangs."""
        import httpx

        deadline = self.started_s + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return time.monotonic() - self.started_s
            except httpx.TransportError:
                pass
            time.sleep(HEALTH_POLL_S)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL the whole group if it does not exit. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._log_file.close()
        return self.process.returncode
