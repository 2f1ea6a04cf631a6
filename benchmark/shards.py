"""`tgserve benchmark shards`: what tensor parallelism costs and saves, per step, from the server itself.

For each shard count the benchmark starts `tgserve serve --num-shard N`, warms it up, then runs rounds
of `batch_size` concurrent greedy requests and reads the server's own metrics before and after: decode
steps (`tgi_batch_inference_count`), their whole and forward seconds, and the collectives of those steps
and the seconds rank 0 spent inside them (`tgserve_batch_collectives`, `tgserve_batch_collective_duration`,
see core/distributed/collective_clock). A decode step then splits into communication (inside
collectives: transfers plus waiting for the slowest rank) and compute (the rest of the forward:
rank 0's share of the model, and sampling). Resident memory is read per rank process from /proc.

On a CPU with fewer cores than ranks x threads, ranks share cores: the table says what this machine
does, not what N devices would.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tgserve.benchmark.prometheus_text import Samples, parse_samples, value
from tgserve.benchmark.server_process import ServerProcess, free_port
from tgserve.benchmark.startup import read_status_mib

PROMPT = "The history of the lighthouse on the northern rock begins with a storm"
SERVE_LIMITS = ("--max-input-tokens", "256", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "1024")


@dataclass(slots=True, frozen=True)
class ShardsConfig:
    """What `tgserve benchmark shards` runs."""

    model_id: str  # checkpoint folder or hub id
    num_shards: tuple[int, ...] = (1, 2)  # --num-shard values, one server each
    batch_sizes: tuple[int, ...] = (1,)  # concurrent requests per round
    max_new_tokens: int = 64  # per request
    rounds: int = 3  # measured rounds per batch size, after one warm-up round
    dtype: str | None = None  # --dtype; None: the backend's default
    serve_args: tuple[str, ...] = ()  # more `tgserve serve` flags
    timeout_s: float = 900.0  # per server start, until healthy
    log_dir: str = ""  # the servers' logs

    def __post_init__(self):
        if not self.num_shards or min(self.num_shards) < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("--num-shard and --batch-size need positive counts")
        if self.max_new_tokens < 2 or self.rounds < 1:
            raise ValueError("--max-new-tokens must be at least 2 (one decode step) and --rounds at least 1")


@dataclass(slots=True)
class ShardsRow:
    """One shard count at one batch size; times are per decode step, in ms."""

    num_shard: int
    batch_size: int
    num_decode_steps: int = 0
    step_ms: float = 0.0  # the whole engine step: plan, forward, sampling, token events
    forward_ms: float = 0.0  # the model runner: forward and sampling, collectives included
    collectives_per_step: float = 0.0
    communication_ms: float = 0.0  # rank 0's seconds inside those collectives
    compute_ms: float = 0.0  # forward_ms - communication_ms
    decode_tokens_per_s: float = 0.0  # batch_size tokens per step
    rss_mib_per_rank: list[float] = field(default_factory=list)  # rank 0 first
    error: str | None = None


def run_shards_bench(config: ShardsConfig) -> list[ShardsRow]:
    """Every shard count, one server at a time; a row per batch size (or one row with its error)."""
    rows = []
    Path(config.log_dir).mkdir(parents=True, exist_ok=True)
    for num_shard in config.num_shards:
        log_path = Path(config.log_dir) / f"serve-{num_shard}-shards.log"
        flags = ["--model-id", config.model_id, "--num-shard", str(num_shard), "--master-port", str(free_port()),
                 *(["--dtype", config.dtype] if config.dtype else []), *SERVE_LIMITS, *config.serve_args]
        server = ServerProcess(flags, log_path)
        try:
            server.wait_healthy(config.timeout_s)
            _round(server.url, 1, config.max_new_tokens)  # warm-up
            for batch_size in config.batch_sizes:
                rows.append(_measure(server, num_shard, batch_size, config))
        except (RuntimeError, TimeoutError, OSError) as error:
            rows.append(ShardsRow(num_shard, 0, error=str(error)))
        finally:
            server.stop()
    return rows


def _measure(server: ServerProcess, num_shard: int, batch_size: int, config: ShardsConfig) -> ShardsRow:
    before = _scrape(server.url)
    for _ in range(config.rounds):
        _round(server.url, batch_size, config.max_new_tokens)
    after = _scrape(server.url)
    row = ShardsRow(num_shard, batch_size, rss_mib_per_rank=rank_rss_mib(server.process.pid))

    def delta(name: str) -> float:
        return value(after, name, method="decode") - value(before, name, method="decode")
    steps = delta("tgi_batch_inference_count")
    if not steps:
        row.error = "no decode steps: every request stopped at its first token"
        return row
    row.num_decode_steps = int(steps)
    row.step_ms = 1000 * delta("tgi_batch_inference_duration_sum") / steps
    row.forward_ms = 1000 * delta("tgi_batch_forward_duration_sum") / steps
    row.collectives_per_step = delta("tgserve_batch_collectives") / steps
    row.communication_ms = 1000 * delta("tgserve_batch_collective_duration_sum") / steps
    row.compute_ms = row.forward_ms - row.communication_ms
    row.decode_tokens_per_s = batch_size * 1000 / row.step_ms
    return row


def _round(url: str, batch_size: int, max_new_tokens: int) -> None:
    """`batch_size` greedy requests at once, each up to `max_new_tokens` tokens."""
    import httpx

    def one(index: int) -> None:
        body = {"inputs": f"{PROMPT} ({index})", "parameters": {"max_new_tokens": max_new_tokens}}
        response = httpx.post(f"{url}/generate", json=body, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"/generate answered {response.status_code}: {response.text}")
    with ThreadPoolExecutor(batch_size) as pool:
        list(pool.map(one, range(batch_size)))


def _scrape(url: str) -> Samples:
    import httpx

    return parse_samples(httpx.get(f"{url}/metrics", timeout=10).text)[0]


def rank_rss_mib(server_pid: int) -> list[float]:
    """Resident MiB of the server process (rank 0) and then of each rank it spawned (its children that
    run multiprocessing's spawn_main), from /proc; a process gone meanwhile is left out."""
    pids = [server_pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == server_pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    found = [read_status_mib(pid).get("VmRSS") for pid in pids]
    return [round(mib) for mib in found if mib is not None]


def machine_meta() -> dict:
    """The CPU, torch and its CPU capability, the cores, and the load now: call it before the run."""
    from tgserve.benchmark.engine_bench import cpu_model

    import torch

    return {"cpu_model": cpu_model(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": len(os.sched_getaffinity(0)), "load_avg_1m_before": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def shards_report(meta: dict, config: ShardsConfig, rows: list[ShardsRow]) -> dict:
    """The JSON the command writes: the machine (`machine_meta` before the run), the config, the rows."""
    return {"meta": meta, "config": asdict(config), "results": [asdict(row) for row in rows]}


_COLUMNS = (("num_shard", "shards"), ("batch_size", "batch"), ("num_decode_steps", "decode steps"),
            ("step_ms", "step ms"), ("forward_ms", "forward ms"), ("compute_ms", "compute ms"),
            ("communication_ms", "communication ms"), ("collectives_per_step", "collectives/step"),
            ("decode_tokens_per_s", "tokens/s"), ("rss_mib_per_rank", "RSS MiB per rank"))


def format_shards_report(report: dict) -> str:
    """The printed form: the machine, one row per shard count and batch size, then any errors."""
    from tgserve.benchmark.engine_report import _table, busy_warning

    meta = report["meta"]
    header = (f"CPU: {meta['cpu_model']} | torch {meta['torch']} (CPU capability {meta['torch_cpu_capability']}) "
              f"| {meta['cpus']} CPUs | load average before {meta['load_avg_1m_before']:.1f}")
    rows = [[_cell(row[key]) for key, _ in _COLUMNS] for row in report["results"] if not row["error"]]
    parts = [header, *([busy_warning(meta)] if busy_warning(meta) else []),
             _table([title for _, title in _COLUMNS], rows)]
    parts += [f"{row['num_shard']} shards: {row['error']}" for row in report["results"] if row["error"]]
    return "\n\n".join(parts)


def _cell(item) -> str:
    if isinstance(item, float):
        return f"{item:.1f}"
    if isinstance(item, list):
        return "/".join(str(v) for v in item)
    return str(item)
