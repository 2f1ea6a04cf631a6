"""The gaudi and inferentia backends: detection, static shapes, and selection once usable.

This machine has neither the Intel Gaudi SDK (habana_frameworks) nor the AWS Neuron SDK
(optimum-neuron, torch-neuronx) nor their devices. The fake modules injected into sys.modules
below stand in for those SDKs, so what these tests check is our detection and our answers, not
the SDKs themselves; the real thing is only exercised on a Gaudi or Inferentia machine.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from tgserve.backends.gaudi import buckets
from tgserve.backends.gaudi import plugin as gaudi
from tgserve.backends.inferentia import plugin as inferentia
from tgserve.core.config import ServerConfig
from tgserve.core.model_config import ModelConfig
from tgserve.core.plugins import BackendRegistry

MODEL_CONFIG = ModelConfig.from_dict({
    "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
})


def fake_module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    """Put a module named `name` into sys.modules, findable by importlib.util.find_spec."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def fake_gaudi_sdk(monkeypatch):
    """Stands in for the Intel Gaudi SDK: habana_frameworks.torch.hpu with eight Gaudi2 cards.

    The Gaudi host has no GPU: on a machine that has one, cuda (the same priority) would win auto.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_module(monkeypatch, "habana_frameworks")
    fake_module(monkeypatch, "habana_frameworks.torch")
    return fake_module(
        monkeypatch, "habana_frameworks.torch.hpu",
        is_available=lambda: True, device_count=lambda: 8, get_device_name=lambda: "GAUDI2",
        memory_stats=lambda device=None: {"Limit": 96 * 2**30, "InUse": 16 * 2**30},
        synchronize=lambda: None,
    )


@pytest.fixture
def fake_neuron_sdk(monkeypatch, tmp_path):
    """Stands in for the AWS Neuron SDK (optimum-neuron, torch-neuronx) and the /dev/neuron0 device."""
    fake_module(monkeypatch, "optimum")
    fake_module(monkeypatch, "optimum.neuron")
    fake_module(monkeypatch, "torch_neuronx")
    device = tmp_path / "neuron0"
    device.touch()
    monkeypatch.setattr(inferentia, "NEURON_DEVICE_PATH", device)


def test_gaudi_without_sdk_is_not_usable():
    status = gaudi.tgserve_get_backend_status()
    if status.is_usable:
        pytest.skip("this machine has a Gaudi")
    assert status.reason == "habana_frameworks is not installed (Intel Gaudi SDK)"
    assert status.install_hint.startswith("pip install tgserve[gaudi]")


def test_gaudi_without_hpu_is_not_usable(fake_gaudi_sdk, monkeypatch):
    monkeypatch.setattr(fake_gaudi_sdk, "is_available", lambda: False)
    status = gaudi.tgserve_get_backend_status()
    assert not status.is_usable and status.reason == "no Gaudi HPU found"


def test_gaudi_with_sdk_is_selected_with_its_own_answers(fake_gaudi_sdk):
    status = gaudi.tgserve_get_backend_status()
    assert status.is_usable and status.device_name == "8x GAUDI2"

    active = BackendRegistry().select("auto")
    assert active.name == "gaudi"
    assert active.hook.tgserve_get_block_size() == 128
    assert active.hook.tgserve_get_device(rank=0) == torch.device("hpu")
    assert active.hook.tgserve_get_free_memory_bytes(device=torch.device("hpu")) == 80 * 2**30
    constraints = active.hook.tgserve_get_shape_constraints(model_config=MODEL_CONFIG, config=ServerConfig())
    assert constraints.decode_batch_buckets == (1, 2, 4, 8, 16, 32, 64)
    assert constraints.max_batch_size == 64
    assert constraints.prefill_token_buckets == tuple(range(128, 4096 + 1, 128))
    assert not constraints.supports_chunked_prefill and not constraints.is_slot_based


def test_gaudi_buckets_follow_the_flags():
    config = ServerConfig(max_batch_size=48, max_input_tokens=1000, max_total_tokens=2000)
    constraints = gaudi.tgserve_get_shape_constraints(model_config=MODEL_CONFIG, config=config)
    assert constraints.decode_batch_buckets == (1, 2, 4, 8, 16, 32, 48)
    assert constraints.prefill_token_buckets == (128, 256, 384, 512, 640, 768, 896, 1024)


def test_bucket_helpers():
    assert buckets.batch_buckets(1) == (1,)
    assert buckets.batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets.sequence_buckets(128) == (128,)
    assert buckets.sequence_buckets(129) == (128, 256)


def test_inferentia_without_sdk_is_not_usable():
    status = inferentia.tgserve_get_backend_status()
    if status.is_usable:
        pytest.skip("this machine has a Neuron device")
    assert "Neuron SDK" in status.reason or "Neuron device" in status.reason
    assert status.install_hint.startswith("pip install tgserve[inferentia]")
    assert inferentia.tgserve_get_device(rank=0) is None


def test_inferentia_without_device_says_so(fake_neuron_sdk, monkeypatch, tmp_path):
    monkeypatch.setattr(inferentia, "NEURON_DEVICE_PATH", tmp_path / "absent" / "neuron0")
    status = inferentia.tgserve_get_backend_status()
    assert not status.is_usable and "no Neuron device found" in status.reason


def test_inferentia_with_sdk_is_usable_and_slot_based(fake_neuron_sdk):
    status = inferentia.tgserve_get_backend_status()
    assert status.is_usable and status.device_name == "1x AWS Neuron device"

    active = BackendRegistry().select("inferentia")
    assert active.hook.tgserve_get_device(rank=0) == torch.device("xla")
    constraints = active.hook.tgserve_get_shape_constraints(model_config=MODEL_CONFIG, config=ServerConfig())
    assert constraints.is_slot_based and not constraints.supports_chunked_prefill
    assert (constraints.max_batch_size, constraints.max_tokens_per_sequence) == (4, 4096)

    config = ServerConfig(max_batch_size=8, max_total_tokens=2048)
    constraints = active.hook.tgserve_get_shape_constraints(model_config=MODEL_CONFIG, config=config)
    assert (constraints.max_batch_size, constraints.max_tokens_per_sequence) == (8, 2048)
