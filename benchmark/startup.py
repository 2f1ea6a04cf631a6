"""`tgserve benchmark startup`: seconds from `tgserve serve` to a healthy server, and what it holds.

For every dtype (and run) asked, start `PYTHON -m tgserve.api.cli serve` as a process of its own
(optionally pinned to some CPUs, to stand for a smaller machine), poll GET /health until it answers
200 while sampling the process's resident memory, read from the server's log what the warmup took
and which `max_batch_prefill_tokens` it chose, let the idle server settle, read its resident memory
again, and stop it with SIGTERM (SIGKILL of its process group if it hangs). A server that dies or
never gets healthy is a row with its error and the last lines of its log, not a crash.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# The lines `core/engine_builder.py` and `core/warmup.py` log; the last two are older servers' form.
_PROBE = re.compile(r"Warmup: probe of (\d+) prefill tokens in ([\d.]+)s \(([\d.]+) tokens/s[^)]*\), "
                    r"([\d.]+)s in all; max_batch_prefill_tokens=(\d+)")
_FULL = re.compile(r"Warmup: (\d+) prefill tokens in ([\d.]+)s(?:; max_batch_prefill_tokens=(\d+))?")
_KV = re.compile(r"KV-cache blocks: (\d+), size: (\d+)(?: \((\d+) MiB\))?")
_BACKEND = re.compile(r"Backend: (.+)$")
POLL_S = 0.1
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 20
# Variables that would override the flags the benchmark passes (`tgserve serve` reads UPPER_SNAKE env).
_OVERRIDDEN_ENV = ("PORT", "HOSTNAME", "MODEL_ID", "DTYPE", "PROMETHEUS_PORT", "JSON_OUTPUT")


@dataclass(slots=True, frozen=True)
class StartupConfig:
    """What to start: `tgserve serve` flags, dtypes, runs, and how to watch it."""

    python: str  # interpreter whose tgserve is measured
    model_id: str | None  # --model-id; None: the server's default model
    dtypes: tuple[str, ...]  # "float32", "bfloat16", "float16" or "default" (no --dtype)
    serve_args: tuple[str, ...] = ()  # more `tgserve serve` flags
    runs: int = 1  # starts per dtype
    cpus: tuple[int, ...] | None = None  # pin the server to these CPUs; None: inherit this process's
    timeout_s: float = 600.0  # per start, until healthy
    settle_s: float = 3.0  # idle seconds after healthy before the settled RSS is read
    log_dir: str | None = None  # keep every server's log here (default: a temporary folder)

    def __post_init__(self) -> None:
        if not self.dtypes:
            raise ValueError("--dtypes needs at least one dtype")
        unknown = [d for d in self.dtypes if d not in ("float32", "bfloat16", "float16", "default")]
        if unknown:
            raise ValueError(f"unknown dtype {unknown[0]!r}: use float32, bfloat16, float16 or default")
        if self.runs < 1 or self.timeout_s <= 0 or self.settle_s < 0:
            raise ValueError("--runs must be >= 1, --timeout-s > 0 and --settle-s >= 0")


@dataclass(slots=True)
class StartupRun:
    """One start of the server (times in seconds, memory in MiB); None where it was not measured."""

    dtype: str  # as asked
    run: int  # 1-based index among the runs of this dtype
    healthy_s: float | None  # from process start to the first 200 of /health
    warmup_s: float | None  # the warmup the server logged (probe or full step)
    max_batch_prefill_tokens: int | None  # the limit the server chose (or was given)
    probe_tokens_per_s: float | None  # the prefill speed the probe measured (None: a full step)
    kv_cache_mib: float | None  # the KV cache the server sized
    peak_rss_mib: float | None  # VmHWM once healthy: the most resident memory during start-up
    settled_rss_mib: float | None  # VmRSS after `settle_s` idle seconds
    served_dtype: str | None = None  # GET /info model_dtype
    backend: str | None = None  # the server's "Backend:" line
    error: str | None = None  # why this start failed, with the log's last lines


def parse_server_log(text: str) -> dict:
    """Warmup seconds, the chosen prefill limit, the probe speed, the KV size and the backend from a log.

    Accepts plain lines and `--json-output` lines (the `message` field). Missing values are None.
    """
    found: dict = {"warmup_s": None, "max_batch_prefill_tokens": None, "probe_tokens_per_s": None,
                   "kv_cache_mib": None, "backend": None}
    for line in text.splitlines():
        message = _message(line)
        if match := _PROBE.search(message):
            found.update(warmup_s=float(match[4]), max_batch_prefill_tokens=int(match[5]),
                         probe_tokens_per_s=float(match[3]))
        elif match := _FULL.search(message):
            found.update(warmup_s=float(match[2]), max_batch_prefill_tokens=int(match[3] or match[1]))
        elif match := _KV.search(message):
            found["kv_cache_mib"] = float(match[3]) if match[3] else None
        elif (match := _BACKEND.search(message)) and found["backend"] is None:
            found["backend"] = match[1].strip()
    return found


def _message(line: str) -> str:
    if line.startswith("{"):
        try:
            return str(json.loads(line).get("message", ""))
        except (json.JSONDecodeError, AttributeError):
            return line
    return line


def read_status_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process in MiB (Linux); {} once it is gone or elsewhere."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values


def run_startup_bench(config: StartupConfig) -> dict:
    """Every start of the benchmark, and the machine it ran on; a JSON-able dict."""
    log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="tgserve-startup-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    meta = machine_meta(config)
    runs = [asdict(start_once(config, dtype, run, log_dir / f"serve-{dtype}-{run}.log"))
            for dtype in config.dtypes for run in range(1, config.runs + 1)]
    return {"meta": {**meta, "log_dir": str(log_dir)}, "config": asdict(config), "results": runs}


def start_once(config: StartupConfig, dtype: str, run: int, log_path: Path) -> StartupRun:
    """Start one server, measure it, stop it."""
    import httpx

    port = _free_port()
    command = [config.python, "-m", "tgserve.api.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
               "--prometheus-port", "0", *(["--model-id", config.model_id] if config.model_id else []),
               *([] if dtype == "default" else ["--dtype", dtype]), *config.serve_args]
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDDEN_ENV}
    cpus = set(config.cpus) if config.cpus else None
    result = StartupRun(dtype, run, None, None, None, None, None, None, None)
    with open(log_path, "wb") as log_file:
        started_s = time.monotonic()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        try:
            url = f"http://127.0.0.1:{port}"
            result.healthy_s, result.error = _wait_healthy(process, url, started_s, config.timeout_s)
            if result.error is None:
                result.peak_rss_mib = read_status_mib(process.pid).get("VmHWM")
                time.sleep(config.settle_s)
                result.settled_rss_mib = read_status_mib(process.pid).get("VmRSS")
                result.served_dtype = httpx.get(f"{url}/info", timeout=10).json().get("model_dtype")
        finally:
            _stop(process)
    found = parse_server_log(log_path.read_text(errors="replace"))
    for key, value in found.items():
        setattr(result, key, value)
    if result.error is not None:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        result.error += "\n" + "\n".join(tail)
    return result


def _wait_healthy(process: subprocess.Popen, url: str, started_s: float,
                  timeout_s: float) -> tuple[float | None, str | None]:
    """(seconds to the first 200 of /health, None), or (None, why not)."""
    import httpx

    deadline_s = started_s + timeout_s
    while time.monotonic() < deadline_s:
        if process.poll() is not None:
            return None, f"the server exited with {process.returncode} before it was healthy"
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return time.monotonic() - started_s, None
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    return None, f"not healthy after {timeout_s:g}s"


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM; SIGKILL the whole process group when it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_meta(config: StartupConfig) -> dict:
    """The CPU, the servers' torch and its CPU capability, the cores they ran on, the load before."""
    from tgserve.benchmark.engine_bench import cpu_model

    cpus = config.cpus or tuple(sorted(os.sched_getaffinity(0)))
    probe = subprocess.run([config.python, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=120)
    torch_version, _, capability = probe.stdout.strip().partition(" ")
    return {"cpu_model": cpu_model(), "torch": torch_version or None, "torch_cpu_capability": capability or None,
            "cpus": len(cpus), "cpu_ids": list(cpus), "load_avg_1m_before": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M"), "python": config.python}


_TORCH_PROBE = "import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())"
_COLUMNS = (("dtype", "dtype"), ("run", "run"), ("served_dtype", "served"), ("healthy_s", "healthy s"),
            ("warmup_s", "warmup s"), ("max_batch_prefill_tokens", "max_batch_prefill_tokens"),
            ("probe_tokens_per_s", "probe tokens/s"), ("kv_cache_mib", "KV MiB"), ("peak_rss_mib", "peak RSS MiB"),
            ("settled_rss_mib", "settled RSS MiB"))


def format_startup_report(report: dict) -> str:
    """The printed form: the machine, one table row per start, then the errors of failed starts."""
    from tgserve.benchmark.engine_report import _table, busy_warning

    meta = report["meta"]
    header = (f"CPU: {meta['cpu_model']} | torch {meta['torch']} (CPU capability {meta['torch_cpu_capability']}) "
              f"| servers on {meta['cpus']} CPUs | load average before {meta['load_avg_1m_before']:.1f}")
    rows = [[_cell(row[key]) for key, _ in _COLUMNS] for row in report["results"]]
    parts = [header, *([busy_warning(meta)] if busy_warning(meta) else []),
             _table([title for _, title in _COLUMNS], rows)]
    parts += [f"{row['dtype']} run {row['run']} failed: {row['error']}" for row in report["results"] if row["error"]]
    backends = sorted({row["backend"] for row in report["results"] if row["backend"]})
    if backends:
        parts.append("Backend: " + "; ".join(backends))
    return "\n\n".join(parts)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)
