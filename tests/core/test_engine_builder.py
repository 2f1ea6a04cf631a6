"""Start-up hands the config's quantization method to the backend's linear-method hook."""
from __future__ import annotations

import pytest
import torch

from tgserve.benchmark.weight_bytes import reachable_tensors
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.layers.linear import Linear

from .engine_harness import running_engine


def test_quantize_reaches_the_linear_method_hook(demo_model_dir):
    """`quantize="eetq"`: every linear layer of the built model (lm_head too) holds int8 weights."""
    with running_engine(demo_model_dir, quantize="eetq", dtype="float32") as engine:
        linears = [m for m in engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and {layer.method.name for layer in linears} == {"eetq"}
    for layer in linears:  # the largest tensor each layer keeps is 8-bit: no float copy of the weight
        largest = max(reachable_tensors(layer.prepared), key=torch.Tensor.numel)
        assert largest.dtype in (torch.int8, torch.uint8) and largest.numel() >= sum(layer.output_sizes)


def test_methods_not_implemented_fail_at_configuration():
    with pytest.raises(ConfigError, match="`--quantize exl2` is TGI's method tgserve does not implement; "
                                          "supported: .*eetq") as refused:
        ServerConfig(quantize="exl2")
    assert {"awq", "compressed-tensors", "gptq"} <= set(str(refused.value).split("supported: ")[1].split(", "))
