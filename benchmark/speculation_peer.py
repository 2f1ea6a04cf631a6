"""transformers' speculative `generate` beside tgserve in `tgserve benchmark speculation`.

On the same token-id prompts, in the same process and threads, one prompt at a time (transformers
runs prompt lookup and assisted generation at batch 1 only): plain greedy `generate`,
`prompt_lookup_num_tokens=N` for each --speculate N > 0, and with `--assistant-model DIR`
`assistant_model=` whose generation config has `num_assistant_tokens=N` on a constant schedule
(tgserve's meaning of N; transformers' default confidence threshold may stop a draft earlier).
Mean accepted length = generated tokens per forward of the target model (a forward hook counts them;
the prompt's forward emits the first token), so plain greedy reads 1.0, as tgserve's speculate 0.
"""
from __future__ import annotations

import time


def _variants(config, assistant) -> list[tuple[str, int, dict]]:
    """(method, speculate, generate kwargs) of every transformers row."""
    variants = [("none", 0, {})]
    for n in sorted(set(config.speculates) - {0}):
        variants.append(("prompt lookup", n, {"prompt_lookup_num_tokens": n}))
        if assistant is not None:
            variants.append(("assisted", n, {"assistant_model": assistant}))
    return variants


def run_transformers(model_dir: str, dtype: str, ids: dict[str, list[list[int]]], config,
                     eos_token_ids: tuple[int, ...]) -> list[dict]:
    """One row per workload and variant (see the module docstring); rows carry tgserve's row keys."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    assistant = None
    if config.assistant_model:
        assistant = AutoModelForCausalLM.from_pretrained(config.assistant_model, dtype=torch_dtype).eval()
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    eos = list(eos_token_ids) or None
    rows = []
    for workload, prompts in ids.items():
        reference = None
        for method, speculate, kwargs in _variants(config, assistant):
            num_tokens, elapsed_s, outputs = 0, 0.0, []
            forwards[0] = 0
            if assistant is not None:  # the draft's own generation config sets its guesses per step
                assistant.generation_config.num_assistant_tokens = speculate
                assistant.generation_config.num_assistant_tokens_schedule = "constant"
            for prompt in prompts:
                input_ids = torch.tensor([prompt], dtype=torch.int64)
                start_s = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         max_new_tokens=config.max_new_tokens, do_sample=False, eos_token_id=eos,
                                         pad_token_id=eos[0] if eos else 0,
                                         min_new_tokens=config.max_new_tokens if config.is_eos_ignored else None,
                                         **kwargs)
                elapsed_s += time.perf_counter() - start_s
                generated = out[0, len(prompt):].tolist()
                num_tokens += len(generated)
                outputs.append(generated)
            reference = outputs if reference is None else reference
            rows.append({"engine": f"transformers {transformers.__version__}", "workload": workload,
                         "batch_size": 1, "speculate": speculate, "method": method, "lengths": "-",
                         "num_requests": len(prompts), "output_tokens": num_tokens, "elapsed_s": elapsed_s,
                         "tokens_per_s": num_tokens / elapsed_s,
                         "mean_accepted_length": num_tokens / max(1, forwards[0]), "decode_rows_per_token": None,
                         "num_steps": forwards[0], "same_ids_as_speculate_0": outputs == reference})
    return rows
