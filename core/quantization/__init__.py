"""Quantized weights: one module per checkpoint format, each a `LinearMethod` the model never looks inside.

`quant_config` reads what the checkpoint says (`quantization_config`) and reconciles it with
`--quantize`; `weight_only` is the common form every integer format converts to (affine groups) and
the kernels that run it; `registry` maps a method name to its `LinearMethod` class.
"""
