"""The cuda and rocm backends tell a CUDA build, a ROCm build and a CPU-only build apart.

torch.version and torch.cuda are patched to look like each build, so these run on any machine;
the real GPUs are exercised by the conformance suite where one is present.
"""
from __future__ import annotations

import pytest
import torch

from tgserve.backends.cuda import plugin as cuda
from tgserve.backends.rocm import plugin as rocm


@pytest.fixture
def fake_build(monkeypatch):
    """Make torch look like a build for `cuda_version` / `hip_version` with `num_gpus` visible."""
    def make(cuda_version=None, hip_version=None, num_gpus=0, gpu_name="NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.version, "cuda", cuda_version)
        monkeypatch.setattr(torch.version, "hip", hip_version)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: num_gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: num_gpus)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu_name)
    return make


def test_cpu_only_build(fake_build):
    fake_build()
    assert cuda.tgserve_get_backend_status().reason == "this torch build has no CUDA (CPU-only build)"
    assert rocm.tgserve_get_backend_status().reason == "this torch build has no ROCm/HIP support"


def test_cuda_build_without_gpu(fake_build):
    fake_build(cuda_version="13.0")
    status = cuda.tgserve_get_backend_status()
    assert not status.is_usable
    assert status.reason == "no NVIDIA GPU visible (torch.cuda.is_available() is False)"
    assert status.install_hint == "pip install tgserve[cuda] (and a CUDA build of torch)"


def test_cuda_build_with_gpus(fake_build):
    fake_build(cuda_version="13.0", num_gpus=2)
    status = cuda.tgserve_get_backend_status()
    assert status.is_usable and status.priority == 100 and status.device_name == "2x NVIDIA H100 80GB HBM3"
    assert not rocm.tgserve_get_backend_status().is_usable
    assert cuda.tgserve_get_device(rank=3) == torch.device("cuda", 1)
    assert cuda.tgserve_get_device_count() == 2  # `--sharded true` alone: one shard per visible GPU


def test_rocm_build_with_gpu(fake_build):
    fake_build(hip_version="7.0.1", num_gpus=1, gpu_name="AMD Instinct MI300X")
    status = rocm.tgserve_get_backend_status()
    assert status.is_usable and status.device_name == "AMD Instinct MI300X (HIP 7.0.1)"
    cuda_status = cuda.tgserve_get_backend_status()
    assert not cuda_status.is_usable and "--backend rocm" in cuda_status.reason
    assert rocm.tgserve_get_device(rank=0) == torch.device("cuda", 0)


def test_driver_failure_is_a_reason_not_a_crash(fake_build, monkeypatch):
    fake_build(cuda_version="13.0", num_gpus=1)

    def broken_driver(device=None):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(torch.cuda, "get_device_name", broken_driver)
    status = cuda.tgserve_get_backend_status()
    assert not status.is_usable and "driver version is insufficient" in status.reason
