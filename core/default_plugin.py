"""The core's reference answers to the model, attention, KV-cache, quantization and runner hooks.

Registered `trylast`, exactly like any plugin, so a backend that implements a hook wins over it.
Everything here is plain torch and runs on any device torch supports.
"""
from __future__ import annotations

from tgserve.core.hookspecs import hookimpl
from tgserve.core.kv_cache import KVCache
from tgserve.core.layers.fused_ops import TorchFusedOps
from tgserve.core.layers.attention import TorchPagedAttention
from tgserve.core.layers.linear import LinearMethod
from tgserve.core.model_runner import ModelRunner
from tgserve.core.models.registry import model_class
from tgserve.core.quantization.registry import make_quantized_method
from tgserve.core.step_inputs import StepInputs
from tgserve.core.warmup_policy import WarmupPolicy

DEFAULT_BLOCK_SIZE = 16


@hookimpl(trylast=True)
def tgserve_get_block_size():
    return DEFAULT_BLOCK_SIZE


@hookimpl(trylast=True)
def tgserve_get_warmup_policy(model_config, config):
    return WarmupPolicy()  # TGI's full-size warmup step


@hookimpl(trylast=True)
def tgserve_make_linear_method(quantize, dtype, device, quantization):
    if quantization is None:
        return LinearMethod()
    return make_quantized_method(quantization, dtype, dense=LinearMethod())


@hookimpl(trylast=True)
def tgserve_make_attention(model_config, block_size, device, dtype):
    return TorchPagedAttention(model_config.num_attention_heads, model_config.num_key_value_heads,
                               model_config.head_dim, block_size)


@hookimpl(trylast=True)
def tgserve_make_kv_cache(num_blocks, block_size, model_config, device, dtype):
    return KVCache(model_config.num_hidden_layers, num_blocks, block_size, model_config.num_key_value_heads,
                   model_config.head_dim, dtype, device)


@hookimpl(trylast=True)
def tgserve_get_device_count():
    return 1  # one device unless the backend counts more


@hookimpl(trylast=True)
def tgserve_make_fused_ops(dtype, device):
    return TorchFusedOps()


@hookimpl(trylast=True)
def tgserve_make_model(model_config, device, dtype, linear_method, attention, tensor_parallel, fused_ops):
    return model_class(model_config.model_type)(model_config, linear_method, attention, dtype, device,
                                                tensor_parallel, fused_ops)


@hookimpl(trylast=True)
def tgserve_make_step_inputs(capacity, block_size, constraints, device):
    return StepInputs(capacity, block_size, device, constraints)


@hookimpl(trylast=True)
def tgserve_make_model_runner(model, kv_cache, attention, step_inputs, device, vocab_size, config):
    return ModelRunner(model, kv_cache, attention, device, vocab_size, step_inputs,
                       watermark_gamma=config.watermark_gamma, watermark_delta=config.watermark_delta)
