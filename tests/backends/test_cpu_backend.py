"""The cpu backend: oneDNN-packed linear layers against `F.linear`, threads, dtype, memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.backends.cpu import host, plugin
from tgserve.backends.cpu.linear import OneDnnLinearMethod
from tgserve.core.config import ServerConfig
from tgserve.core.layers.linear import LinearMethod
from tgserve.core.plugins import BackendRegistry

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without mkldnn")
# fp32: oneDNN and F.linear sum in a different order; bf16: each rounds its output to 8 mantissa bits.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


def make_linear_method(dtype, quantize=None):
    return plugin.tgserve_make_linear_method(quantize=quantize, dtype=dtype, device=torch.device("cpu"))


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading_shape", [(1,), (7,), (64,), (2, 5), (1, 1)], ids=str)
@pytest.mark.parametrize("has_bias", [True, False])
def test_onednn_linear_matches_f_linear(dtype, leading_shape, has_bias):
    generator = torch.Generator().manual_seed(sum(leading_shape))
    weight = torch.randn(320, 96, generator=generator).to(dtype)
    bias = torch.randn(320, generator=generator).to(dtype) if has_bias else None
    x = torch.randn(*leading_shape, 96, generator=generator).to(dtype)
    method = make_linear_method(dtype)
    assert isinstance(method, OneDnnLinearMethod)

    with torch.inference_mode():
        y = method.apply(method.prepare(weight, bias), x)
        expected = F.linear(x, weight, bias)
    assert y.shape == (*leading_shape, 320) and y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOLERANCES[dtype])


@needs_mkldnn
def test_packed_weight_serves_every_batch_size_with_one_prepare():
    weight = torch.randn(256, 64, dtype=torch.bfloat16)
    method = OneDnnLinearMethod()
    params = method.prepare(weight, None)
    for num_tokens in (1, 7, 64, 0):
        x = torch.randn(num_tokens, 64, dtype=torch.bfloat16)
        torch.testing.assert_close(method.apply(params, x), F.linear(x, weight), **TOLERANCES[torch.bfloat16])


@needs_mkldnn
def test_dtype_may_be_named():
    assert isinstance(make_linear_method("bfloat16"), OneDnnLinearMethod)


def test_reference_method_for_float16_and_quantized():
    assert make_linear_method(torch.float16) is None
    assert make_linear_method(torch.bfloat16, quantize="gptq") is None


def test_falls_back_to_core_method_without_mkldnn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert make_linear_method(torch.bfloat16) is None
    active = BackendRegistry().select("cpu")
    method = active.hook.tgserve_make_linear_method(quantize=None, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert type(method) is LinearMethod


def test_physical_cores_count_smt_siblings_once(tmp_path):
    # Two packages, two cores each, two hyper-threads per core: cpu ids 0-7.
    for cpu in range(8):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{cpu // 4}\n")
        (topology / "core_id").write_text(f"{cpu % 2}\n")
    assert host.num_physical_cores(set(range(8)), tmp_path) == 4
    assert host.num_physical_cores({0, 2}, tmp_path) == 1  # siblings of one core
    assert host.num_physical_cores({0, 4}, tmp_path) == 2  # same core id, different packages
    assert host.num_physical_cores({0, 9}, tmp_path) == 2  # no topology for cpu9: count logical cpus


@pytest.fixture
def restore_threads():
    num_threads = torch.get_num_threads()
    yield
    torch.set_num_threads(num_threads)


def test_on_startup_sets_one_thread_per_usable_core(monkeypatch, restore_threads):
    plugin.tgserve_on_startup(config=ServerConfig())
    assert torch.get_num_threads() == host.num_physical_cores(host.usable_cpus())

    monkeypatch.setattr(host, "usable_cpus", lambda: {0})  # as under `taskset -c 0`
    plugin.tgserve_on_startup(config=ServerConfig())
    assert torch.get_num_threads() == 1


def test_status_and_simple_answers():
    status = plugin.tgserve_get_backend_status()
    assert status.is_usable and status.name == "cpu"
    assert f"{host.num_physical_cores(host.usable_cpus())} threads" in status.device_name
    assert plugin.tgserve_get_device(rank=3) == torch.device("cpu")
    assert plugin.tgserve_get_dist_backend() == "gloo"
    assert plugin.tgserve_synchronize(device=torch.device("cpu")) is True
    assert plugin.tgserve_get_block_size() == 16


def test_default_dtype_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(host, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert plugin.tgserve_get_default_dtype() == "bfloat16"
    monkeypatch.setattr(host, "cpu_flags", lambda: {"avx2", "fma"})
    assert plugin.tgserve_get_default_dtype() == "float32"


def test_free_memory_is_a_conservative_share_of_available():
    free_bytes = plugin.tgserve_get_free_memory_bytes(device=torch.device("cpu"))
    assert 0 < free_bytes <= host.available_memory_bytes() * 0.51
