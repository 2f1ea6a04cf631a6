"""Write a quantized checkpoint with a third-party tool, as the cross-check for tgserve's loaders (issue 12).

    python -P benchmark/third_party_quantize.py llmcompressor-gptq MODEL_DIR OUT_DIR [--group-size 32]

(-P: this folder holds a `datasets.py` that would shadow the `datasets` package.) The script imports
nothing of tgserve, so any environment with llm-compressor runs it.

`llmcompressor-gptq`: llm-compressor's GPTQModifier, W4A16 int4 symmetric with groups, saved as
compressed-tensors `pack-quantized` (what llm-compressor ships for W4A16). Calibration: tgserve's
builtin prose (checkpoints/data/calibration_corpus.txt). llm-compressor 0.14 pins transformers <= 5.17,
so it runs in its own environment (a venv with llmcompressor installed); the
checkpoint it writes is then served by tgserve in the project's environment. GPTQModel and AutoAWQ do
not install here (no CPU wheels / CUDA builds; see the quantcli report in issue 12).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CALIBRATION = Path(__file__).resolve().parent.parent / "checkpoints" / "data" / "calibration_corpus.txt"
TOOLS = ("llmcompressor-gptq",)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=TOOLS)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--group-size", type=int, default=32)
    args = parser.parse_args(argv)
    print(write_llmcompressor_gptq(args.model_dir, args.out_dir, args.group_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
