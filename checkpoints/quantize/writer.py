"""Write the quantized checkpoint: config.json with `quantization_config`, model.safetensors, the rest copied.

Everything is written into a hidden sibling folder `.OUT_DIR.partial-PID` that is renamed to OUT_DIR
only once complete, and removed if anything fails: an interrupted run never leaves OUT_DIR looking
like a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from tgserve.checkpoints.quantize.affine import QuantSpec
from tgserve.checkpoints.quantize.layerwise import QuantizedModel
from tgserve.checkpoints.quantize.lm_head import head_quantization_config, with_quantized_head
from tgserve.checkpoints.quantize.packing import pack_awq, pack_gptq
from tgserve.core.weights import iter_weights

_NOT_COPIED = ("config.json", "model.safetensors.index.json")  # rewritten; *.safetensors are rewritten too


def quantization_config(spec: QuantSpec) -> dict:
    """config.json's `quantization_config`, as transformers' GPTQConfig / AwqConfig (AutoGPTQ, AutoAWQ) write it."""
    if spec.method == "gptq":
        return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size,
                "desc_act": spec.is_act_order, "sym": spec.is_sym, "checkpoint_format": "gptq",
                **head_quantization_config(spec), "damp_percent": spec.damp_percent, "true_sequential": True,
                "static_groups": False}
    return {"quant_method": "awq", "bits": spec.bits, "group_size": spec.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}


@contextlib.contextmanager
def atomic_output(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh sibling folder to write into; rename it to out_dir on success, remove it on failure."""
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _packed(prefix: str, linear, spec: QuantSpec) -> dict[str, torch.Tensor]:
    if spec.method == "awq":
        return {f"{prefix}.{key}": value for key, value in pack_awq(linear).items()}
    bits = spec.lm_head_bits if prefix == "lm_head" else spec.bits
    return {f"{prefix}.{key}": value for key, value in pack_gptq(linear, bits).items()}


def quantized_tensors(model_dir: Path, quantized: QuantizedModel, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The output checkpoint's tensors: packed linears, and every other source tensor in its own dtype
    (from the model after quantization, which holds AWQ's folded norms and biases). A quantized head of
    a tied model has no source tensor of its own: its packed tensors are added beside the embedding."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in iter_weights(model_dir):
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix in quantized.linears:
            tensors.update(_packed(prefix, quantized.linears[prefix], spec))
        else:
            tensors[name] = quantized.state.get(name, tensor).detach().to(tensor.dtype).contiguous()
    if "lm_head" in quantized.linears and "lm_head.scales" not in tensors:
        tensors.update(_packed("lm_head", quantized.linears["lm_head"], spec))
    missing = set(quantized.linears) - {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".scales")}
    if missing:
        raise RuntimeError(f"quantized linears without a source tensor: {sorted(missing)[:3]}")
    return tensors


def write_checkpoint(model_dir: Path, out_dir: Path, config: dict, spec: QuantSpec, quantized: QuantizedModel
                     ) -> Path:
    """Write the quantized checkpoint to out_dir (atomically); returns out_dir."""
    with atomic_output(out_dir) as partial:
        save_file(quantized_tensors(model_dir, quantized, spec), str(partial / "model.safetensors"),
                  metadata={"format": "pt"})
        if spec.lm_head_bits is not None:
            config = with_quantized_head(config)
        (partial / "config.json").write_text(
            json.dumps({**config, "quantization_config": quantization_config(spec)}, indent=2) + "\n")
        for path in sorted(model_dir.iterdir()):
            if path.is_file() and path.name not in _NOT_COPIED and path.suffix != ".safetensors":
                shutil.copy2(path, partial / path.name)
    return out_dir
