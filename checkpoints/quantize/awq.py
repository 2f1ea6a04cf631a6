"""AWQ (Lin et al., 2023) on one Llama/Qwen2 decoder layer: activation-aware per-input-channel scales.

For each group of linears that read the same input x, try s = mean|x|^alpha (per input channel,
normalised by sqrt(max s * min s)) for alpha on a grid over [0, 1], quantize W * s to nearest, and keep
the alpha whose inspected block output (attention, MLP, or the linear itself) is closest in mean
squared error to the float block's on the calibration activations. alpha = 0 is s = 1, plain
round-to-nearest, so the chosen scales never do worse than it on these activations. The linears keep
W * s and the op that produces x absorbs 1 / s, so the float model computes the same function.

Groups, as AutoAWQ's Llama/Qwen2 definitions (its `get_layers_for_scaling`):
  input_layernorm -> q_proj, k_proj, v_proj   (block: self_attn)
  v_proj -> o_proj, only when v_proj and o_proj have the same shape (no grouped-query attention)
  post_attention_layernorm -> gate_proj, up_proj   (block: mlp)
  up_proj -> down_proj   (block: down_proj)
This is AutoAWQ's `duo_scaling=False` search. Then, as AutoAWQ's `apply_clip`, each linear except
q_proj and k_proj (whose errors pass through the softmax) has its weights clipped to the shrink of
max |w| per (row, group), among 1, 0.95, ... 0.55, that best reproduces the group's partial outputs.
"""
from __future__ import annotations

from typing import Callable

import torch

from tgserve.checkpoints.quantize.affine import QuantSpec, fake_quantize

NUM_GRID_POINTS = 20  # alpha in {0, 1/20, ..., 19/20}, AutoAWQ's grid
MAX_CLIP_SHRINK = 0.5  # clip search: max |w| scaled by 1 - i / NUM_GRID_POINTS while that stays above this
MAX_CLIP_TOKENS = 512  # clip search: tokens sampled evenly from the calibration activations


def search_scale(x: torch.Tensor, linears: list[torch.nn.Linear], block: Callable[[torch.Tensor], torch.Tensor],
                 spec: QuantSpec) -> tuple[torch.Tensor, list[float]]:
    """The per-input-channel scale s [in] minimising the block's output error, and the loss per alpha.

    x: [..., in] the float input the linears share; block(x) runs the inspected module with the
    linears' current weights. The linears' weights are restored before returning.
    """
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(dim=0)
    originals = [linear.weight.data.clone() for linear in linears]
    with torch.no_grad():
        reference = block(x)
        losses: list[float] = []
        best_scale, best_loss = torch.ones_like(x_mean), float("inf")
        for step in range(NUM_GRID_POINTS):
            alpha = step / NUM_GRID_POINTS
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for linear, weight in zip(linears, originals):
                linear.weight.data = (fake_quantize(weight * s, spec) / s).to(weight.dtype)
            loss = float((block(x) - reference).float().pow(2).mean())
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_scale = loss, s.clone()
        for linear, weight in zip(linears, originals):
            linear.weight.data = weight
    return best_scale, losses


def fold_scale(previous: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """Multiply the linears' input columns by s and divide the previous op's output by s (in place).

    previous: an RMSNorm (its weight [in]) or a Linear (its last s.numel() output rows and bias).
    """
    with torch.no_grad():
        if isinstance(previous, torch.nn.Linear):
            rows = slice(previous.weight.shape[0] - s.numel(), None)
            previous.weight[rows] /= s[:, None].to(previous.weight.dtype)
            if previous.bias is not None:
                previous.bias[rows] /= s.to(previous.bias.dtype)
        else:
            previous.weight /= s.to(previous.weight.dtype)
            if getattr(previous, "bias", None) is not None:
                previous.bias /= s.to(previous.bias.dtype)
        for linear in linears:
            linear.weight *= s[None, :].to(linear.weight.dtype)


def search_clip(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per (row, group) clip bound [out, num_groups, 1] for weight [out, in] given its input x [..., in]."""
    out_features, in_features = weight.shape
    group = spec.group_size
    flat = x.reshape(-1, in_features).float()
    flat = flat[::max(1, flat.shape[0] // MAX_CLIP_TOKENS)][:MAX_CLIP_TOKENS]
    x_groups = flat.reshape(flat.shape[0], in_features // group, group)  # [tokens, groups, group]
    w_groups = weight.float().reshape(out_features, in_features // group, group)
    reference = torch.einsum("tgk,ogk->ogt", x_groups, w_groups)  # each group's partial outputs
    original_max = w_groups.abs().amax(dim=-1, keepdim=True)
    best_max = original_max.clone()
    best_err = torch.full(original_max.shape[:2], float("inf"))
    for step in range(int(MAX_CLIP_SHRINK * NUM_GRID_POINTS)):
        bound = original_max * (1 - step / NUM_GRID_POINTS)
        clipped = torch.maximum(torch.minimum(w_groups, bound), -bound).reshape(out_features, in_features)
        quantized = fake_quantize(clipped, spec).reshape(w_groups.shape)
        err = (torch.einsum("tgk,ogk->ogt", x_groups, quantized) - reference).pow(2).mean(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], bound, best_max)
    return best_max


def clip_weight(linear: torch.nn.Linear, x: torch.Tensor, spec: QuantSpec) -> None:
    """Clip linear's weight in place to the bounds `search_clip` finds on its input x."""
    with torch.no_grad():
        bound = search_clip(linear.weight.data, x, spec)
        w = linear.weight.data.float().reshape(*bound.shape[:2], -1)
        linear.weight.data = torch.maximum(torch.minimum(w, bound), -bound).reshape(
            linear.weight.shape).to(linear.weight.dtype)


def awq_scale_layer(layer: torch.nn.Module, inputs: dict[str, torch.Tensor], attn_kwargs: dict,
                    spec: QuantSpec) -> dict[str, list[float]]:
    """Search and fold AWQ scales, then search and apply clipping, for one decoder layer in place;
    returns the scale search's losses per group.

    inputs: the float inputs [batch, seq, features] of q_proj, o_proj, gate_proj and down_proj,
    captured from one forward of the layer. attn_kwargs: what the decoder layer passes to self_attn.
    """
    attn, mlp = layer.self_attn, layer.mlp
    losses: dict[str, list[float]] = {}

    def attention(x: torch.Tensor) -> torch.Tensor:
        return attn(hidden_states=x, **attn_kwargs)[0]

    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    s, losses["qkv"] = search_scale(inputs["q_proj"], qkv, attention, spec)
    fold_scale(layer.input_layernorm, qkv, s)
    clip_inputs = {"v": (attn.v_proj, inputs["q_proj"] / s)}  # the linears now see x / s
    o_input = inputs["o_proj"]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        s, losses["o"] = search_scale(o_input, [attn.o_proj], attn.o_proj, spec)
        fold_scale(attn.v_proj, [attn.o_proj], s)
        o_input = o_input / s
    clip_inputs["o"] = (attn.o_proj, o_input)
    gate_up = [mlp.gate_proj, mlp.up_proj]
    s, losses["gate_up"] = search_scale(inputs["gate_proj"], gate_up, mlp, spec)
    fold_scale(layer.post_attention_layernorm, gate_up, s)
    clip_inputs["gate"] = (mlp.gate_proj, inputs["gate_proj"] / s)
    clip_inputs["up"] = (mlp.up_proj, inputs["gate_proj"] / s)
    s, losses["down"] = search_scale(inputs["down_proj"], [mlp.down_proj], mlp.down_proj, spec)
    fold_scale(mlp.up_proj, [mlp.down_proj], s)
    clip_inputs["down"] = (mlp.down_proj, inputs["down_proj"] / s)
    for linear, x in clip_inputs.values():
        clip_weight(linear, x, spec)
    return losses
