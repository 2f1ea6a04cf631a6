"""The Llama decoder family: Llama itself, and (with q/k/v biases) Qwen2. One forward for both.

Constructors allocate; `load_weights` fills tensors from checkpoint names; `finalize` hands linear
weights to the linear method (packing, quantizing) once everything is loaded. Linears declare their
tensor-parallel style (q/k/v and gate/up column, o and down row, lm_head column over the vocabulary)
and get this rank's place from a `TensorParallel` context: each rank holds its query heads and KV
heads (KV heads replicated when ranks outnumber them), sums o and down's partial outputs, embeds
its vocabulary rows and hands its logits slice to be gathered on rank 0. At one rank the same code
runs: every layer holds the whole tensor and both collectives return at once.

The residual stream travels beside the hidden states: each layer's norms add the previous sublayer's
(all-reduced) output into it and normalize the sum in one fused-ops call (`tgserve_make_fused_ops`),
as do the final norm and the MLP's SiLU-and-multiply.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tgserve.core.distributed.head_sharding import shard_heads
from tgserve.core.distributed.tensor_parallel import TensorParallel
from tgserve.core.distributed.vocab_parallel_embedding import VocabParallelEmbedding
from tgserve.core.forward_batch import ForwardBatch
from tgserve.core.layers.fused_ops import TorchFusedOps
from tgserve.core.layers.attention import PagedAttention
from tgserve.core.layers.linear import Linear, LinearMethod, Parallel
from tgserve.core.layers.norm import RMSNorm
from tgserve.core.layers.rotary import RotaryEmbedding
from tgserve.core.model_config import ModelConfig


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, method: LinearMethod, attention: PagedAttention,
                 dtype: torch.dtype, device: torch.device, prefix: str, tp: TensorParallel, fused_ops):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        heads = shard_heads(cfg, tp.world_size)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, d  # this rank's
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        kw = dict(method=method, dtype=dtype, device=device, rank=tp.rank, world_size=tp.world_size)
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        full_q, full_kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        self.qkv_proj = Linear(h, [full_q, full_kv, full_kv], cfg.attention_bias, parallel=Parallel.COLUMN,
                               prefixes=(attn + "q_proj", attn + "k_proj", attn + "v_proj"),
                               part_shards=[tp.world_size, heads.num_kv_shards, heads.num_kv_shards], **kw)
        self.o_proj = Linear(full_q, [h], False, parallel=Parallel.ROW, prefixes=(attn + "o_proj",), **kw)
        self.gate_up_proj = Linear(h, [cfg.intermediate_size] * 2, False, parallel=Parallel.COLUMN,
                                   prefixes=(mlp + "gate_proj", mlp + "up_proj"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, [h], False, parallel=Parallel.ROW,
                                prefixes=(mlp + "down_proj",), **kw)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype, device, fused_ops)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype, device, fused_ops)
        self.fused_ops = fused_ops
        self.attention = attention
        self.intermediate_size = cfg.intermediate_size // tp.world_size  # this rank's gate / up width
        self.tp = tp

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin, layer_cache,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output [T, hidden] (the embeddings, with `residual` None, at the
        first layer); residual: the stream before it. Returns (this layer's MLP output, the stream before
        it), whose sum is this layer's output. cos_sin: the step's rotary tables, [T, 1, head_dim] each."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        qkv = self.qkv_proj(x)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = self.fused_ops.rotary(cos_sin, qk.unflatten(-1, (self.num_heads + self.num_kv_heads, self.head_dim)))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        attn = self.attention.forward(q, k, v.unflatten(-1, (self.num_kv_heads, self.head_dim)), layer_cache, batch)
        x, residual = self.post_attention_layernorm(self.tp.all_reduce(self.o_proj(attn)), residual)
        x = self.fused_ops.silu_and_mul(self.gate_up_proj(x))
        return self.tp.all_reduce(self.down_proj(x)), residual


# checkpoint sub-name -> (our attribute, its fused part inside that layer)
_LAYER_WEIGHTS = {
    "self_attn.q_proj": ("qkv_proj", 0), "self_attn.k_proj": ("qkv_proj", 1), "self_attn.v_proj": ("qkv_proj", 2),
    "self_attn.o_proj": ("o_proj", 0), "mlp.gate_proj": ("gate_up_proj", 0), "mlp.up_proj": ("gate_up_proj", 1),
    "mlp.down_proj": ("down_proj", 0),
}


class LlamaForCausalLM(nn.Module):
    """Token ids in, hidden states out; `compute_logits` turns selected hidden states into logits.

    `tp` places this process among the ranks sharing the model (default: unsharded). `attention`
    must be sized for this rank's heads (`core.distributed.head_sharding.local_model_config`), and so
    must the KV cache `forward` is given. Raises ShardCountError when the heads do not split over the ranks.
    `fused_ops` (default: the torch reference) runs the norms and the MLP's activation.
    """

    def __init__(self, cfg: ModelConfig, method: LinearMethod, attention: PagedAttention,
                 dtype: torch.dtype, device: torch.device, tp: TensorParallel | None = None, fused_ops=None):
        super().__init__()
        tp = tp or TensorParallel.single()
        fused_ops = fused_ops or TorchFusedOps()
        shard_heads(cfg, tp.world_size)  # the named error before any layer's own, less helpful one
        self.config, self.tp = cfg, tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, method, attention, dtype, device, f"model.layers.{index}.", tp,
                                                 fused_ops)
                                    for index in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, fused_ops)
        self.lm_head = Linear(cfg.hidden_size, [cfg.vocab_size], False, method, dtype, device, Parallel.COLUMN,
                              tp.rank, tp.world_size, prefixes=("lm_head",))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.num_rope_positions, cfg.rope_theta,
                                      cfg.rope_scaling, dtype, device)

    def forward(self, batch: ForwardBatch, kv_cache) -> torch.Tensor:
        """Run every layer over the packed tokens of `batch`; returns hidden states [T, hidden]."""
        x = self.embed_tokens(batch.input_ids)
        cos_sin = self.rotary.lookup(batch.positions)
        residual = None
        for layer, layer_cache in zip(self.layers, kv_cache.layers):
            x, residual = layer(x, residual, cos_sin, layer_cache, batch)
        return self.norm(x, residual)[0] if residual is not None else self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> float32 logits [N, vocab] on rank 0, None on the other ranks (which must
        call it too: each computes its vocabulary slice and the slices are gathered to rank 0)."""
        return self.tp.gather_logits(self.lm_head(hidden).float())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill parameters from (checkpoint name, tensor) pairs, then hand linears to their method."""
        seen_lm_head, embedding = False, None
        for name, tensor in weights:
            seen_lm_head |= name.startswith("lm_head.")
            if name == "model.embed_tokens.weight" and self.config.tie_word_embeddings:
                embedding = tensor  # the whole [vocab, hidden]: a tied lm_head takes its own rank's slice of it
            self._load_one(name, tensor)
        if not seen_lm_head:
            if not self.config.tie_word_embeddings:
                raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
            if embedding is None:
                raise ValueError("checkpoint has neither lm_head.weight nor model.embed_tokens.weight")
            self.lm_head.load(0, "weight", embedding)
        for module in self.modules():
            if isinstance(module, Linear):
                module.finalize()

    def _load_one(self, name: str, tensor: torch.Tensor) -> None:
        if name == "model.embed_tokens.weight":
            self.embed_tokens.load(tensor)
        elif name == "model.norm.weight":
            self.norm.weight.data.copy_(tensor)
        elif name.startswith("lm_head."):  # "weight", or a quantized format's tensors
            self.lm_head.load(0, name[len("lm_head."):], tensor)
        elif name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            layer = self.layers[int(index)]
            module_name, kind = rest.rsplit(".", 1)
            if module_name in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, module_name).weight.data.copy_(tensor)
            elif module_name in _LAYER_WEIGHTS:
                attr, part = _LAYER_WEIGHTS[module_name]
                getattr(layer, attr).load(part, kind, tensor)
            elif "rotary_emb" not in module_name:
                raise ValueError(f"unexpected checkpoint tensor {name}")
        elif "rotary_emb" not in name:
            raise ValueError(f"unexpected checkpoint tensor {name}")
