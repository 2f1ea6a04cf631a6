"""Start-up hands the config's quantization method to the backend's linear-method hook."""
from __future__ import annotations

import pytest
import torch

from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.layers.linear import Linear

from .engine_harness import running_engine


def test_quantize_reaches_the_linear_method_hook(demo_model_dir):
    """`quantize="eetq"`: every linear layer of the built model (lm_head too) holds int8 weights."""
    with running_engine(demo_model_dir, quantize="eetq", dtype="float32") as engine:
        linears = [m for m in engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and {layer.method.name for layer in linears} == {"eetq"}
    assert all(layer.prepared[0].dtype == torch.int8 for layer in linears)


def test_methods_not_implemented_fail_at_configuration():
    with pytest.raises(ConfigError, match="`--quantize gptq` is TGI's method tgserve does not implement yet; "
                                          "supported: eetq"):
        ServerConfig(quantize="gptq")
