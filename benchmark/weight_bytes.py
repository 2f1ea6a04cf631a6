"""Resident weight bytes of a built model: what its layers keep after loading (packed, quantized or dense).

Counted from the tensors each module holds, parameters and buffers, and every tensor reachable from a
`Linear`'s prepared form (tuples, dicts, slots dataclasses), each storage once. Linear layers are also
counted on their own: that is where quantization changes the bytes (embeddings and norms stay float).
"""
from __future__ import annotations

import torch
from torch import nn

from tgserve.core.layers.linear import Linear


def reachable_tensors(value) -> list[torch.Tensor]:
    """Every tensor reachable from `value` through tuples, lists, dicts and slots dataclasses."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in reachable_tensors(item)]
    if isinstance(value, dict):
        return reachable_tensors(list(value.values()))
    slots = getattr(type(value), "__slots__", ())
    return reachable_tensors([getattr(value, name) for name in slots if hasattr(value, name)])


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage once (a view costs nothing extra)."""
    seen, total = set(), 0
    for tensor in tensors:
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # opaque tensors (e.g. mkldnn layout): count elements
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def model_weight_bytes(model: nn.Module) -> dict[str, int]:
    """{"linear_bytes": the Linear layers' prepared tensors, "total_bytes": those plus every other
    module's parameters and buffers (embeddings, norms; the KV cache is not a module tensor here)}."""
    linear = [t for module in model.modules() if isinstance(module, Linear) for t in reachable_tensors(module.prepared)]
    others = [t for module in model.modules() if not isinstance(module, Linear)
              for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))]
    return {"linear_bytes": tensor_bytes(linear), "total_bytes": tensor_bytes(linear + others)}
