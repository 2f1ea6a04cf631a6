"""Run a Llama/Qwen2 model's decoder layers one at a time on the calibration activations, quantizing each.

transformers' model (float32) computes the inputs of the first decoder layer and the keyword arguments
every layer receives (rotary position embeddings, causal mask), captured by forward pre-hooks during
one float forward. Each layer then runs alone: its linears' inputs are collected by hooks, the layer is
quantized (GPTQ: the four sequential groups q/k/v, o, gate/up, down, each calibrated on inputs that
already pass through the quantized groups before it, as AutoGPTQ's true-sequential; AWQ: scales searched
and folded, then round-to-nearest), its weights are replaced by their dequantized values, and its output
becomes the next layer's input, so later layers calibrate on the errors they will see when served.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from tgserve.checkpoints.quantize.affine import QuantizedLinear, QuantSpec, round_to_nearest
from tgserve.checkpoints.quantize.awq import awq_scale_layer
from tgserve.checkpoints.quantize.gptq import HessianAccumulator, gptq_quantize
from tgserve.checkpoints.quantize.lm_head import quantize_head

# Linear names inside a decoder layer, in AutoGPTQ's true-sequential groups.
SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LINEAR_NAMES = tuple(name for group in SEQUENTIAL_GROUPS for name in group)
_NOT_FOR_LAYERS = ("cache", "past_key_values", "use_cache", "output_attentions")


@dataclass(slots=True)
class QuantizedModel:
    """What the writer needs: the quantized linears and the model's float tensors after quantization."""

    linears: dict[str, QuantizedLinear]  # "model.layers.0.self_attn.q_proj" (or "lm_head") -> its quantized weight
    state: dict[str, torch.Tensor]  # the model's state_dict after quantization (AWQ folds scales into norms)


def capture_layer_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The first decoder layer's hidden states [batch, seq, hidden] and each layer's keyword arguments."""
    layers = model.model.layers
    first_input: list[torch.Tensor] = []
    layer_kwargs: list[dict] = [{} for _ in layers]

    def recorder(index: int):
        def hook(_module, args, kwargs):
            if index == 0:
                first_input.append(args[0] if args else kwargs["hidden_states"])
            layer_kwargs[index] = {k: v for k, v in kwargs.items()
                                   if k != "hidden_states" and k not in _NOT_FOR_LAYERS}
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return first_input[0], layer_kwargs


def _collect_inputs(layer: torch.nn.Module, names: tuple[str, ...], hidden: torch.Tensor, kwargs: dict,
                    sink) -> None:
    """Run layer(hidden) once, calling sink(name, input) with each named linear's input."""
    def hook_for(name: str):
        return lambda _module, args: sink(name, args[0].detach())

    handles = [layer.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with torch.no_grad():
            layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _gptq_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, spec: QuantSpec
                ) -> dict[str, QuantizedLinear]:
    results = {}
    for group in SEQUENTIAL_GROUPS:
        accumulators = {name: HessianAccumulator(layer.get_submodule(name).in_features) for name in group}
        _collect_inputs(layer, group, hidden, kwargs, lambda name, x: accumulators[name].add(x))
        for name in group:
            linear = layer.get_submodule(name)
            results[name] = gptq_quantize(linear.weight.data, accumulators[name].hessian(), spec)
            linear.weight.data = results[name].dequantize().to(linear.weight.dtype)
    return results


def _awq_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, spec: QuantSpec
               ) -> dict[str, QuantizedLinear]:
    inputs: dict[str, torch.Tensor] = {}
    wanted = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    _collect_inputs(layer, wanted, hidden, kwargs, lambda name, x: inputs.__setitem__(name.split(".")[-1], x))
    awq_scale_layer(layer, inputs, kwargs, spec)
    results = {}
    for name in LINEAR_NAMES:
        linear = layer.get_submodule(name)
        results[name] = round_to_nearest(linear.weight.data, spec)
        linear.weight.data = results[name].dequantize().to(linear.weight.dtype)
    return results


def quantize_layers(model: torch.nn.Module, input_ids: torch.Tensor, spec: QuantSpec, *,
                    progress: bool = True) -> QuantizedModel:
    """Quantize every decoder layer's linears of `model` (float32, modified in place) on input_ids [batch, seq],
    and lm_head where spec.lm_head_bits asks (lm_head.py)."""
    hidden, layer_kwargs = capture_layer_inputs(model, input_ids)
    quantize_one = _gptq_layer if spec.method == "gptq" else _awq_layer
    linears: dict[str, QuantizedLinear] = {}
    layers = model.model.layers
    for index in tqdm(range(len(layers)), desc=f"{spec.method} {spec.bits}-bit", unit="layer",
                      disable=not progress):
        layer, kwargs = layers[index], layer_kwargs[index]
        for name, quantized in quantize_one(layer, hidden, kwargs, spec).items():
            linears[f"model.layers.{index}.{name}"] = quantized
        with torch.no_grad():
            hidden = layer(hidden, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    if spec.lm_head_bits is not None:  # its input: the final norm of what the quantized layers output
        linears["lm_head"] = quantize_head(model, hidden, spec)
    return QuantizedModel(linears=linears, state=model.state_dict())
