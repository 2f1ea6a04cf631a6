"""Write a quantized checkpoint with a third-party tool, as the cross-check for tgserve's loaders (issue 12).

    python -P benchmark/third_party_quantize.py TOOL MODEL_DIR OUT_DIR [--group-size 32]

(-P: this folder holds a `datasets.py` that would shadow the `datasets` package.) The script imports
nothing of tgserve; each tool runs in an environment of its own (their pins disagree with the
project's), and the checkpoint it writes is then served by tgserve in the project's environment.
Calibration: tgserve's builtin prose (checkpoints/data/calibration_corpus.txt). Tools, as run here on
the demo checkpoint (CPU, torch 2.13+cpu), each in a venv that also sees the project's packages:
  llmcompressor-gptq  `pip install llmcompressor` (0.14; it brings transformers 5.17): GPTQModifier
      W4A16, int4 symmetric groups, saved as compressed-tensors `pack-quantized`.
  gptqmodel-gptq  `pip install --no-deps gptqmodel Defuser Device-SMI LogBar PyPcre TokeNicer
      threadpoolctl torchao` (7.7; with its dependencies it would replace torch by a CUDA build):
      GPTQ v1 layout, desc_act, sym. Needs GPTQMODEL_CPU_WORKERS=2 on a 2-core host (its default
      thread pool otherwise refuses to start); compiles a CPU packing extension on first use.
  autoawq  `pip install autoawq` (0.2.9, deprecated upstream): AWQ GEMM. Its clip search asserts
      output features divisible by 64 (the demo's 352 are not), so this runs it with apply_clip=False.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CALIBRATION = Path(__file__).resolve().parent.parent / "checkpoints" / "data" / "calibration_corpus.txt"
TOOLS = ("llmcompressor-gptq", "gptqmodel-gptq", "autoawq")


def write_llmcompressor_gptq(model_dir: Path, out_dir: Path, group_size: int, seq_tokens: int = 256) -> Path:
    """Quantize model_dir with llm-compressor's GPTQ (int4, symmetric, group_size) into out_dir."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(CALIBRATION.read_text()).ids
    windows = [ids[i:i + seq_tokens] for i in range(0, len(ids) - seq_tokens + 1, seq_tokens)]
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq_tokens for _ in windows]})
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"])
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seq_tokens,
            num_calibration_samples=len(windows))
    model.save_pretrained(str(out_dir), save_compressed=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json" \
                and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def _paragraphs() -> list[str]:
    return [p for p in CALIBRATION.read_text().split("\n\n") if len(p) > 200]


def write_gptqmodel_gptq(model_dir: Path, out_dir: Path, group_size: int) -> Path:
    """Quantize model_dir with GPTQModel (int4, symmetric, act-order, group_size) into out_dir."""
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(model_dir), QuantizeConfig(bits=4, group_size=group_size, desc_act=True, sym=True),
                           device="cpu")
    model.quantize(_paragraphs(), batch_size=1)
    model.save(str(out_dir))
    return out_dir


def write_autoawq(model_dir: Path, out_dir: Path, group_size: int) -> Path:
    """Quantize model_dir with AutoAWQ (GEMM, 4-bit, zero point, group_size) into out_dir."""
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    model = AutoAWQForCausalLM.from_pretrained(str(model_dir))
    paragraphs = _paragraphs()
    model.quantize(AutoTokenizer.from_pretrained(str(model_dir)),
                   quant_config={"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"},
                   calib_data=paragraphs, max_calib_samples=len(paragraphs), max_calib_seq_len=256,
                   apply_clip=False)
    model.save_quantized(str(out_dir))
    for path in model_dir.iterdir():  # AutoAWQ saves no tokenizer
        if path.is_file() and path.suffix != ".safetensors" and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)
    return out_dir


WRITERS = {"llmcompressor-gptq": write_llmcompressor_gptq, "gptqmodel-gptq": write_gptqmodel_gptq,
           "autoawq": write_autoawq}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=TOOLS)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--group-size", type=int, default=32)
    args = parser.parse_args(argv)
    print(WRITERS[args.tool](args.model_dir, args.out_dir, args.group_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
