"""Write Qwen2 checkpoints that need no network: a tiny trained demo model, or random real shapes.

`write_demo_model(dir)` trains a ~0.9M-parameter Qwen2ForCausalLM for ~50 CPU-seconds on the
bundled corpus, so greedy output is recognisable English and ChatML answers end in <|im_end|>;
it is small enough for end-to-end and golden tests on CPU. `write_demo_model(dir, "qwen2-7b")`
writes random bf16 weights with the exact dimensions of a released Qwen2 model (for load and
memory tests), tensor by tensor and shard by shard, so memory stays near one shard.
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM

from tgserve.checkpoints.demo_tokenizer import (
    ENDOFTEXT,
    IM_END,
    build_demo_tokenizer,
    read_demo_corpus,
    render_chat,
    special_token_ids,
    write_demo_tokenizer,
    write_json,
)
from tgserve.checkpoints.model_cache import cache_root, ensure_cached

DEMO_CACHE_NAME = "demo-qwen2-v1"

# Dimensions of the released Qwen2 models (Qwen/Qwen2-*-Instruct config.json). Note that
# Qwen2-7B pads its vocabulary to 152064 rows where the smaller two use 151936.
_QWEN2_COMMON = dict(max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
SHAPES: dict[str, dict] = {
    "qwen2-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, **_QWEN2_COMMON,
    ),
    "qwen2-1.5b": dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, **_QWEN2_COMMON,
    ),
    "qwen2-7b": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, **_QWEN2_COMMON,
    ),
}

# The trained demo model: GQA (4 query heads share 2 KV heads), untied lm_head, qkv bias.
DEMO_DIMS = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=352, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
DEMO_VOCAB_MULTIPLE = 128  # pad the embedding rows past the tokenizer, as Qwen2 does
NUM_TRAIN_STEPS = 400
TRAIN_BATCH_SEQS = 16
TRAIN_SEQ_TOKENS = 128
# One thread: float reductions (hence the weights) then do not depend on the host's core count,
# and a busy machine does not stall the build (two spinning OpenMP threads on a shared 2-core
# host ran 5x slower than one).
TRAIN_NUM_THREADS = 1
LEARNING_RATE = 3e-3
NUM_WARMUP_STEPS = 20
NUM_CHAT_REPEATS = 2  # copies of the ChatML Q&A examples in the training stream

MAX_SHARD_BYTES = 2 * 10**9
INIT_STD = 0.02


def default_demo_model_dir() -> Path:
    """Return where `ensure_demo_model` caches the demo model: $TGSERVE_CACHE or ~/.cache/tgserve."""
    return cache_root() / DEMO_CACHE_NAME


def ensure_demo_model() -> Path:
    """Return the cached demo model directory, building it first if it does not exist.

    Built once per cache folder, atomically (see `ensure_cached`).
    """
    return ensure_cached(DEMO_CACHE_NAME, lambda build_dir: write_demo_model(build_dir),
                         what="the demo model (about a minute)")


def write_demo_model(
    out_dir: str | Path, shape: str | None = None, *, seed: int = 0, progress: bool = False
) -> Path:
    """Write a Qwen2 checkpoint with the demo tokenizer into `out_dir` and return its path.

    shape: None for the small trained demo model (float32), or a key of `SHAPES` for random
        bfloat16 weights with that released model's dimensions.
    seed: seeds training or random init; the same seed writes the same bytes.
    progress: show tqdm progress bars.
    """
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer()
    token_ids = special_token_ids(tokenizer)
    write_demo_tokenizer(out_dir, tokenizer)
    if shape is None:
        _write_trained_demo(out_dir, tokenizer, token_ids, seed=seed, progress=progress)
    else:
        dims = SHAPES[shape]
        write_json(out_dir / "config.json", qwen2_config(dims, token_ids, dtype="bfloat16"))
        write_random_qwen2_weights(out_dir, dims, seed=seed, progress=progress)
    write_json(out_dir / "generation_config.json", _generation_config(token_ids))
    return out_dir


def _generation_config(token_ids: dict[str, int]) -> dict:
    """Qwen2-Instruct's generation_config.json: stop on <|im_end|> or <|endoftext|>, greedy."""
    return {
        "bos_token_id": token_ids[ENDOFTEXT],
        "do_sample": False,
        "eos_token_id": [token_ids[IM_END], token_ids[ENDOFTEXT]],
        "pad_token_id": token_ids[ENDOFTEXT],
    }


def qwen2_config(dims: dict, token_ids: dict[str, int], dtype: str) -> dict:
    """Return config.json contents for a Qwen2ForCausalLM in the layout transformers 5 writes.

    Also carries a top-level "rope_theta" for readers older than `rope_parameters`.
    """
    num_layers = dims["num_hidden_layers"]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": token_ids[ENDOFTEXT],
        "dtype": dtype,
        "eos_token_id": token_ids[IM_END],
        "hidden_act": "silu",
        "hidden_size": dims["hidden_size"],
        "initializer_range": INIT_STD,
        "intermediate_size": dims["intermediate_size"],
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": dims["max_position_embeddings"],
        "max_window_layers": num_layers,
        "model_type": "qwen2",
        "num_attention_heads": dims["num_attention_heads"],
        "num_hidden_layers": num_layers,
        "num_key_value_heads": dims["num_key_value_heads"],
        "pad_token_id": None,
        "rms_norm_eps": dims["rms_norm_eps"],
        "rope_parameters": {"rope_theta": dims["rope_theta"], "rope_type": "default"},
        "rope_theta": dims["rope_theta"],
        "sliding_window": None,
        "tie_word_embeddings": dims["tie_word_embeddings"],
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": dims["vocab_size"],
    }


# ---------------------------------------------------------------- random weights, real shapes


def qwen2_tensor_shapes(dims: dict) -> dict[str, tuple[int, ...]]:
    """Return {HF parameter name: shape} for a Qwen2ForCausalLM with `dims`, in module order."""
    hidden, ffn, vocab = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    head_dim = hidden // dims["num_attention_heads"]
    q_features = dims["num_attention_heads"] * head_dim
    kv_features = dims["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(dims["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for proj, out_features in (("q", q_features), ("k", kv_features), ("v", kv_features)):
            shapes[f"{prefix}self_attn.{proj}_proj.weight"] = (out_features, hidden)
            shapes[f"{prefix}self_attn.{proj}_proj.bias"] = (out_features,)
        shapes[f"{prefix}self_attn.o_proj.weight"] = (hidden, q_features)
        shapes[f"{prefix}mlp.gate_proj.weight"] = (ffn, hidden)
        shapes[f"{prefix}mlp.up_proj.weight"] = (ffn, hidden)
        shapes[f"{prefix}mlp.down_proj.weight"] = (hidden, ffn)
        shapes[f"{prefix}input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not dims["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def plan_shards(shapes: dict[str, tuple[int, ...]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names, in order, into shards of at most `max_shard_bytes` of bf16 each.

    A single tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        num_bytes = math.prod(shape) * 2
        if shards[-1] and shard_bytes + num_bytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += num_bytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Return a bf16 tensor for parameter `name`: ones for norms, else N(0, INIT_STD**2).

    Each tensor has its own generator seeded from (seed, name), so values do not depend on
    which shard the tensor lands in.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator).mul_(INIT_STD).to(torch.bfloat16)


def write_random_qwen2_weights(
    out_dir: Path, dims: dict, *, seed: int, progress: bool, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Write random bf16 Qwen2 weights as model.safetensors, or as shards plus an index.

    Only one shard's tensors are in memory at a time.
    """
    shapes = qwen2_tensor_shapes(dims)
    shards = plan_shards(shapes, max_shard_bytes)
    num_shards = len(shards)
    file_names = (
        ["model.safetensors"]
        if num_shards == 1
        else [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    )
    total_bytes = sum(math.prod(shape) * 2 for shape in shapes.values())
    weight_map: dict[str, str] = {}
    with tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress) as bar:
        for file_name, names in zip(file_names, shards):
            tensors = {}
            for name in names:
                tensors[name] = random_tensor(name, shapes[name], seed)
                weight_map[name] = file_name
                bar.update(tensors[name].nbytes)
            save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
            del tensors
    if num_shards > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        write_json(out_dir / "model.safetensors.index.json", index)


# ---------------------------------------------------------------- the trained demo model


def demo_training_ids(tokenizer: Tokenizer) -> torch.Tensor:
    """Return the training token stream [num_tokens]: the corpus, then its Q&A pairs as ChatML.

    The chat examples teach the model to answer after "<|im_start|>assistant\\n" and stop.
    """
    corpus = read_demo_corpus()
    ids = tokenizer.encode(corpus).ids
    endoftext_id = tokenizer.token_to_id(ENDOFTEXT)
    pairs = re.findall(r"^Q: (.+)\nA: (.+)$", corpus, flags=re.MULTILINE)
    for _ in range(NUM_CHAT_REPEATS):
        for question, answer in pairs:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            ids += [endoftext_id] + tokenizer.encode(render_chat(messages)).ids
    return torch.tensor(ids, dtype=torch.long)


@contextlib.contextmanager
def _deterministic_torch(seed: int, num_threads: int) -> Iterator[None]:
    """Seed torch, fix its CPU thread count and force deterministic kernels; restore on exit."""
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(saved_deterministic, warn_only=saved_warn_only)
            torch.set_num_threads(saved_threads)


def _train(model: torch.nn.Module, ids: torch.Tensor, *, seed: int, progress: bool) -> None:
    """Train `model` in place on random windows of `ids` with AdamW and a warmup-cosine schedule."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.0
    )

    def lr_scale(step: int) -> float:
        warmup = min(1.0, (step + 1) / NUM_WARMUP_STEPS)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * step / NUM_TRAIN_STEPS))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)
    model.train()
    for _ in tqdm(range(NUM_TRAIN_STEPS), desc="training demo model", disable=not progress):
        num_starts = len(ids) - TRAIN_SEQ_TOKENS + 1
        starts = torch.randint(0, num_starts, (TRAIN_BATCH_SEQS,), generator=generator)
        # [TRAIN_BATCH_SEQS, TRAIN_SEQ_TOKENS]; the model shifts labels by one itself.
        batch = torch.stack([ids[start : start + TRAIN_SEQ_TOKENS] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _write_trained_demo(
    out_dir: Path, tokenizer: Tokenizer, token_ids: dict[str, int], *, seed: int, progress: bool
) -> None:
    """Build, train and save (float32 safetensors, transformers' config.json) the demo model."""
    num_tokens = tokenizer.get_vocab_size()
    vocab_size = -(-num_tokens // DEMO_VOCAB_MULTIPLE) * DEMO_VOCAB_MULTIPLE
    config = Qwen2Config(
        vocab_size=vocab_size,
        bos_token_id=token_ids[ENDOFTEXT],
        eos_token_id=token_ids[IM_END],
        **DEMO_DIMS,
    )
    with _deterministic_torch(seed, TRAIN_NUM_THREADS):
        model = Qwen2ForCausalLM(config)
        _train(model, demo_training_ids(tokenizer), seed=seed, progress=progress)
    model.save_pretrained(out_dir)

