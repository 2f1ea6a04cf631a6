"""`tgserve benchmark gpu-check`: the checks and numbers a session records whenever it is lent a GPU.

Run through `benchmarks/gpu_check.sh` on the device machine (its header gives the exact call). Each
step runs in a child process of its own (`gpu_check_steps.py`), under a timeout cut from one overall
budget, so a hang, a crash or a CUDA error in one step costs that step only and the rest still
report. After every step the summary is rewritten, so a run stopped from outside still leaves what
it measured. Files in the results folder: `gpu_check.json` (every step's result), `engine_bench.json`
(the full engine benchmark report) and `steps.log` (the children's output).

A later issue adds its own GPU check as a step: a function in `gpu_check_steps.STEP_FUNCTIONS` that
returns {"status", "headline", ...}, and its (name, time limit) in `STEPS` below.

With `--small` the same steps run at toy sizes (the CPU run CI makes, so the script is known to work
before a GPU arrives); the device-only parts (SmolLM2 unless a checkpoint is given) say why they skip.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SUMMARY_FILE = "gpu_check.json"
LOG_FILE = "steps.log"
MIN_STEP_S = 20.0  # a step is not started with less of the budget left than this
# (step, its own time limit in seconds) in the order they run: the cheap and the most wanted first.
STEPS = (("backends", 90.0), ("parity-demo", 150.0), ("serve-demo", 150.0), ("bench-qwen2-7b", 300.0),
         ("quant-kernels", 90.0), ("parity-smollm2", 240.0))


@dataclass(slots=True, frozen=True)
class GpuCheckConfig:
    """One run of the check; handed to every step as JSON."""

    backend: str  # the backend every step forces: "cuda" on the device, "cpu" here
    is_small: bool  # toy sizes everywhere (the CPU run)
    out_dir: str  # results folder ($OUT on the device)
    work_dir: str  # checkpoints written by the steps (the Qwen2-7B one is 15 GB)
    budget_s: float  # all steps together
    demo_model_dir: str | None = None  # a built demo checkpoint; None: the cached one (built on first use)
    smollm2_dir: str | None = None  # a built SmolLM2 checkpoint; None: `tgserve demo-model --real smollm2-135m`
    steps: tuple[str, ...] = tuple(name for name, _ in STEPS)  # which steps to run

    def __post_init__(self) -> None:
        unknown = set(self.steps) - {name for name, _ in STEPS}
        if unknown:
            raise ValueError(f"unknown step(s) {', '.join(sorted(unknown))}; known: {', '.join(n for n, _ in STEPS)}")
        if self.budget_s <= 0:
            raise ValueError(f"--budget-s must be > 0, got {self.budget_s}")


def _tail(path: Path, num_lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])


def run_step(name: str, config_path: Path, out_dir: Path, timeout_s: float) -> dict:
    """Run one step in a child process (its own session); its result, or a failure saying why."""
    result_path = out_dir / f".{name}.result.json"
    result_path.unlink(missing_ok=True)
    log_path = out_dir / LOG_FILE
    with open(log_path, "ab") as log:
        log.write(f"\n===== {name} ({time.strftime('%H:%M:%S')}, limit {timeout_s:.0f} s)\n".encode())
        log.flush()
        start_s = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "tgserve.benchmark.gpu_check_steps", name, str(config_path),
                                  str(result_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            returncode = None
    seconds = time.monotonic() - start_s
    if result_path.exists():
        result = json.loads(result_path.read_text())
        result_path.unlink()
    elif returncode is None:
        result = {"status": "failed", "headline": f"timed out after {timeout_s:.0f} s", "log_tail": _tail(log_path)}
    else:
        result = {"status": "failed", "headline": f"the step exited with {returncode} and no result",
                  "log_tail": _tail(log_path)}
    return {"name": name, **result, "seconds": round(seconds, 1)}


def run_check(config: GpuCheckConfig) -> dict:
    """Every step of `config` in order, within its budget; the summary (also written to gpu_check.json)."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    config_path = out_dir / ".gpu_check_config.json"
    config_path.write_text(json.dumps(asdict(config)))
    summary = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **asdict(config)}, "steps": []}
    start_s = time.monotonic()
    try:
        for name, limit_s in STEPS:
            if name not in config.steps:
                continue
            left_s = config.budget_s - (time.monotonic() - start_s)
            if left_s < MIN_STEP_S:
                step = {"name": name, "status": "skipped", "headline": f"the {config.budget_s:.0f} s budget is spent"}
            else:
                step = run_step(name, config_path, out_dir, min(limit_s, left_s))
            summary["steps"].append(step)
            print(format_step_line(step), flush=True)
            _write_summary(summary, out_dir, start_s)
    finally:
        config_path.unlink(missing_ok=True)
    return summary


def _write_summary(summary: dict, out_dir: Path, start_s: float) -> None:
    summary["meta"]["total_s"] = round(time.monotonic() - start_s, 1)
    summary["passed"] = not any(step["status"] == "failed" for step in summary["steps"])
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def format_step_line(step: dict) -> str:
    """`name: status (seconds) headline-or-reason` for one step."""
    seconds = f" ({step['seconds']:.0f} s)" if "seconds" in step else ""
    detail = step.get("headline", "")
    return f"{step['name']}: {step['status']}{seconds}{' - ' + detail if detail else ''}"


def format_summary(summary: dict) -> str:
    """The table printed last: one row per step."""
    lines = ["| step | status | s | result |", "|---|---|---|---|"]
    for step in summary["steps"]:
        detail = step.get("headline", "").replace("\n", " ")
        lines.append(f"| {step['name']} | {step['status']} | {step.get('seconds', 0):.0f} | {detail} |")
    verdict = "PASSED" if summary["passed"] else "FAILED"
    meta = summary["meta"]
    lines.append(f"\ngpu check {verdict} on backend {meta['backend']} in {meta['total_s']:.0f} s; "
                 f"results in {meta['out_dir']}")
    return "\n".join(lines)
