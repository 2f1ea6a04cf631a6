"""Method name -> the core's reference `LinearMethod` class for that format (one module per format)."""
from __future__ import annotations

import torch

from tgserve.core.layers.linear import LinearMethod
from tgserve.core.quantization.awq import AwqLinearMethod
from tgserve.core.quantization.compressed_tensors import CompressedTensorsLinearMethod
from tgserve.core.quantization.eetq import EetqLinearMethod
from tgserve.core.quantization.fp8 import Fp8LinearMethod
from tgserve.core.quantization.gguf import GgufLinearMethod
from tgserve.core.quantization.gptq import GptqLinearMethod
from tgserve.core.quantization.method import QuantizedLinearMethod
from tgserve.core.quantization.nf4 import Nf4LinearMethod
from tgserve.core.quantization.quant_config import QuantizationConfig
from tgserve.core.quantization.weight_only import WeightOnlyKernel

FORMATS: dict[str, type[QuantizedLinearMethod]] = {
    "awq": AwqLinearMethod,
    "compressed-tensors": CompressedTensorsLinearMethod,
    "bitsandbytes-nf4": Nf4LinearMethod,
    "eetq": EetqLinearMethod,
    "fp8": Fp8LinearMethod,
    "gguf": GgufLinearMethod,
    "gptq": GptqLinearMethod,
}


def make_quantized_method(quantization: QuantizationConfig, dtype: torch.dtype, dense: LinearMethod,
                          kernels: tuple[WeightOnlyKernel, ...] = ()) -> QuantizedLinearMethod | None:
    """The format's method with `dense` for float layers and `kernels` tried before the reference;
    None when no format of that name is implemented."""
    format_class = FORMATS.get(quantization.method)
    return None if format_class is None else format_class(quantization, dtype, dense, kernels)
