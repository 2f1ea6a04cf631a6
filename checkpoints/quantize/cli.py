"""`tgserve quantize`: declared here and mounted by `tgserve.api.cli`. torch and transformers load in the
handler, after every check that can refuse the job (source, layout, output folder, calibration text)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SEQ_TOKENS = 512
DEFAULT_MAX_SAMPLES = 64


def add_quantize_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `quantize` to the `tgserve` subparsers."""
    quantize = commands.add_parser(
        "quantize", help="write a GPTQ or AWQ checkpoint (Hugging Face layout) from a float Llama/Qwen2 one")
    quantize.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="float checkpoint folder")
    quantize.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="new folder for the quantized checkpoint")
    quantize.add_argument("--method", choices=("gptq", "awq"), required=True)
    quantize.add_argument("--bits", type=int, default=4, help="weight bits: gptq 2, 4 or 8; awq 4 (default: 4)")
    quantize.add_argument("--group-size", type=int, default=128,
                          help="input features per scale; gptq also -1, one per output (default: 128)")
    quantize.add_argument("--act-order", action="store_true",
                          help="gptq: quantize columns by decreasing activation energy (desc_act)")
    quantize.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                          help="gptq: symmetric (default) or asymmetric zero points; awq is asymmetric")
    quantize.add_argument("--lm-head-bits", type=int, default=None, metavar="{4,8}",
                          help="gptq: quantize lm_head too, with these bits (its largest matrix on a small model: "
                               "faster decode, some quality lost); default: lm_head stays float")
    quantize.add_argument("--calibration", default="builtin", metavar="FILE_OR_BUILTIN",
                          help="UTF-8 text like what the model will serve, or `builtin` (default), "
                               "the English prose tgserve ships")
    quantize.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_TOKENS,
                          help=f"tokens per calibration window (default: {DEFAULT_SEQ_TOKENS})")
    quantize.add_argument("--num-samples", type=int, default=DEFAULT_MAX_SAMPLES,
                          help=f"at most this many windows (default: {DEFAULT_MAX_SAMPLES})")
    quantize.set_defaults(handler=run_quantize)
    return quantize


def run_quantize(args: argparse.Namespace) -> int:
    """The `tgserve quantize` handler; returns the exit code."""
    from tgserve.checkpoints.quantize.affine import QuantSpec
    from tgserve.checkpoints.quantize.calibration import calibration_windows
    from tgserve.checkpoints.quantize.source import QuantizeRefused, check_layout, check_output, check_source

    is_sym = args.sym if args.sym is not None else args.method == "gptq"
    spec = QuantSpec(method=args.method, bits=args.bits, group_size=args.group_size,
                     is_act_order=args.act_order, is_sym=is_sym, lm_head_bits=args.lm_head_bits)
    try:
        config = check_source(args.model_dir)
        check_layout(config, spec)
        check_output(args.out_dir)
        calibration = calibration_windows(args.calibration, args.model_dir, seq_tokens=args.seq_len,
                                          max_samples=args.num_samples)
    except QuantizeRefused as error:
        print(f"tgserve: error: {error}", file=sys.stderr, flush=True)
        return 1
    num_samples, seq_tokens = calibration.input_ids.shape
    head = "float" if spec.lm_head_bits is None else f"{spec.lm_head_bits}-bit"
    print(f"tgserve quantize: {spec.method} {spec.bits}-bit, group size {spec.group_size}, lm_head {head}, "
          f"calibration {calibration.source}: {num_samples} windows of {seq_tokens} tokens "
          f"(of {calibration.num_text_tokens})", file=sys.stderr, flush=True)
    return _quantize(args.model_dir, args.out_dir, config, spec, calibration.input_ids)


def _quantize(model_dir: Path, out_dir: Path, config: dict, spec, input_ids) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from tgserve.checkpoints.quantize.layerwise import quantize_layers
    from tgserve.checkpoints.quantize.writer import write_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    quantized = quantize_layers(model, input_ids, spec, progress=True)
    print(write_checkpoint(model_dir, out_dir, config, spec, quantized))
    return 0
