"""`tgserve benchmark quality`: what quantization costs in accuracy, on tgserve's own engine and model code.

The reference is the unquantized model (method `none`) at `--dtype` (default bfloat16). Each method
is built through the real start-up path (`quality_engine.build_quality_engine`) on the same
checkpoint, or on the pre-quantized checkpoint given for it, and scored teacher-forced on the same
token windows (`quality_windows`): perplexity, its ratio to the reference's, top-1 agreement with the
reference (share of scored positions whose argmax equals the reference's argmax) and top-1 accuracy
(argmax equals the text's next token). A method this build does not implement, or a pre-quantized-only
method without a checkpoint, gets a row saying so instead of stopping the run.
"""
from __future__ import annotations

import gc
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tgserve.benchmark.quality_engine import build_quality_engine, position_logits
from tgserve.benchmark.quality_windows import Window, score_window, windows

REFERENCE = "none"  # the unquantized model at the run dtype
DEFAULT_METHODS = ("none", "eetq", "fp8", "gptq", "awq", "bitsandbytes-nf4")
NOT_IMPLEMENTED = "not implemented in this build"


def known_methods() -> tuple[str, ...]:
    """Every name `--methods` accepts: `none` and TGI's --quantize names (implemented here or not)."""
    from tgserve.core.config import TGI_QUANTIZE_METHODS

    return (REFERENCE, *sorted(TGI_QUANTIZE_METHODS))


@dataclass(slots=True, frozen=True)
class QualityConfig:
    """What one `tgserve benchmark quality` run scores."""

    model_id: str | None  # float checkpoint (folder or hub id); None = SmolLM2-135M-Instruct, as `tgserve serve`
    methods: tuple[str, ...] = DEFAULT_METHODS  # rows, in order; the reference runs first whether listed or not
    checkpoints: dict[str, str] = field(default_factory=dict)  # method -> its own (pre-quantized) checkpoint
    dtype: str = "bfloat16"  # run dtype of every method, the reference included
    backend: str = "auto"
    text_path: str | None = None  # None = the shipped held-out corpus (checkpoints/data/heldout_corpus.txt)
    window: int = 512  # tokens per forward
    stride: int = 256  # tokens between window starts (< window): each target scored once, after >= window - stride
    max_tokens: int | None = None  # score only the text's first max_tokens tokens

    def __post_init__(self) -> None:
        known = known_methods()
        for name in (*self.methods, *self.checkpoints):
            if name not in known:
                raise ValueError(f"unknown quantization method {name!r}; known: {', '.join(known)}")
        if not self.methods:
            raise ValueError("no methods to score")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2, got {self.max_tokens}")
        windows(self.window + 1, self.window, self.stride)  # raises on a bad window / stride


def _skip_reason(method: str, checkpoint: str | None) -> str | None:
    """Why a method gets no numbers in this build, or None when it can run."""
    from tgserve.core.config import QUANTIZE_METHODS
    from tgserve.core.quantization.quant_config import PREQUANTIZED_ONLY

    if method != REFERENCE and method not in QUANTIZE_METHODS:
        return NOT_IMPLEMENTED
    if method in PREQUANTIZED_ONLY and checkpoint is None:
        return f"needs a pre-quantized checkpoint: --checkpoint {method}=DIR"
    return None


def _score(engine, token_ids: list[int], spans: list[Window],
           reference_predicted: list | None) -> tuple[dict, list]:
    """Run every window; the row's numbers and the argmax per window (int64 tensors).

    reference_predicted: the reference's argmax per window; None when `engine` is the reference."""
    nll_sum, num_correct, num_agree, predicted = 0.0, 0, 0, []
    for index, span in enumerate(spans):
        scores = score_window(position_logits(engine, token_ids[span.begin:span.end]), token_ids, span)
        nll_sum += scores.nll_sum
        num_correct += scores.num_correct
        predicted.append(scores.predicted)
        if reference_predicted is not None:
            num_agree += int((scores.predicted == reference_predicted[index]).sum())
    num_targets = sum(span.num_targets for span in spans)
    row = {"num_targets": num_targets, "mean_nll": nll_sum / num_targets,
           "perplexity": math.exp(nll_sum / num_targets), "top1_accuracy": num_correct / num_targets,
           "top1_agreement": 1.0 if reference_predicted is None else num_agree / num_targets}
    return row, predicted


@dataclass(slots=True)
class _ReferenceRun:
    """What every method is compared with: the reference's token ids, windows and argmax per window."""

    token_ids: list[int]
    spans: list[Window]
    predicted: list  # int64 [window.num_targets] per window


def _run_method(config: QualityConfig, method: str, text: str,
                reference: _ReferenceRun | None) -> tuple[dict, _ReferenceRun]:
    """Build, score and free one method's engine (the reference when `reference` is None); its row,
    and what it ran on. Raises ValueError when its tokenizer gives other ids than the reference's."""
    checkpoint = config.checkpoints.get(method)
    start = time.monotonic()
    engine = build_quality_engine(checkpoint or config.model_id, config.dtype,
                                  None if method == REFERENCE else method, config.backend, config.window)
    try:
        token_ids = engine.tokenizer.encode(text)[:config.max_tokens]
        if reference is not None and token_ids != reference.token_ids:
            raise ValueError(f"{checkpoint or config.model_id}: its tokenizer gives other ids for the text "
                             "than the reference's")
        spans = reference.spans if reference else windows(len(token_ids), config.window, config.stride)
        scores, predicted = _score(engine, token_ids, spans, reference.predicted if reference else None)
        info = engine.model_info
        row = {"method": method, "status": "ok", "note": "", "model_id": info.model_id,
               "quantization": info.quantization, "dtype": info.model_dtype, "backend": info.backend, **scores}
    finally:
        engine.shutdown(drain_timeout_s=0)
        del engine
        gc.collect()
    row["elapsed_s"] = time.monotonic() - start
    return row, _ReferenceRun(token_ids, spans, predicted)


def _meta(config: QualityConfig, text: str, num_tokens: int, num_windows: int) -> dict:
    import importlib.metadata
    import os

    import torch

    from tgserve.benchmark.engine_bench import cpu_model
    from tgserve.checkpoints.heldout_text import HELDOUT_PATH

    return {"tgserve": importlib.metadata.version("tgserve"), "torch": torch.__version__,
            "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "text": config.text_path or f"tgserve/checkpoints/data/{HELDOUT_PATH.name}",
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "num_words": len(text.split()),
            "num_tokens": num_tokens, "num_windows": num_windows}


def run_quality(config: QualityConfig) -> dict:
    """The whole benchmark: the reference, then each method; a JSON-able dict (meta, config, results).

    Raises what building the reference raises; a method that fails to build gets an `error` row."""
    from tgserve.benchmark.engine_cli import _run_errors
    from tgserve.checkpoints.heldout_text import read_heldout_text

    text = read_heldout_text(config.text_path)
    reference_row, reference = _run_method(config, REFERENCE, text, None)
    rows = []
    for method in config.methods:
        if method == REFERENCE:
            rows.append(reference_row)
            continue
        reason = _skip_reason(method, config.checkpoints.get(method))
        if reason is not None:
            rows.append({"method": method, "status": "not-implemented" if reason == NOT_IMPLEMENTED else "skipped",
                         "note": reason})
            continue
        try:
            rows.append(_run_method(config, method, text, reference)[0])
        except _run_errors() as error:
            rows.append({"method": method, "status": "error", "note": str(error)})
    for row in rows:
        if row["status"] == "ok":
            row["perplexity_ratio"] = row["perplexity"] / reference_row["perplexity"]
    return {"meta": _meta(config, text, len(reference.token_ids), len(reference.spans)), "config": asdict(config),
            "reference": reference_row, "results": rows}


def format_quality_report(report: dict) -> str:
    """The printed form: a header naming model, machine and text, then one row per method."""
    from tgserve.benchmark.engine_report import _table

    meta, reference = report["meta"], report["reference"]
    config = report["config"]
    header = (f"Model: {reference['model_id']} | reference: unquantized {reference['dtype']} on {reference['backend']} "
              f"| text: {meta['text']} ({meta['num_words']} words, {meta['num_tokens']} tokens, {meta['num_windows']} "
              f"windows of {config['window']}, stride {config['stride']}) | CPU: {meta['cpu_model']} "
              f"({meta['cpu_capability']}) | {meta['date']}")
    rows = []
    for row in report["results"]:
        if row["status"] != "ok":
            note = f"error: {row['note']}" if row["status"] == "error" else row["note"]
            rows.append([row["method"], "-", "-", "-", "-", "-", note])
            continue
        weights = row["quantization"]["description"] if row["quantization"] else f"unquantized {row['dtype']}"
        rows.append([row["method"], weights, f"{row['perplexity']:.4f}", f"{row['perplexity_ratio']:.4f}",
                     f"{row['top1_agreement']:.4f}", f"{row['top1_accuracy']:.4f}", ""])
    table = _table(["Method", "Weights", "Perplexity", "PPL / ref", "Top-1 agree", "Top-1 acc", "Note"], rows)
    return header + "\n\n" + table
