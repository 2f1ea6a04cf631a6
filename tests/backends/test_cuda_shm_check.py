"""The cuda (and rocm) backend's start-up check of /dev/shm for NCCL between the ranks of one machine.

A container's default /dev/shm is a 64 MiB tmpfs; the test mounts one (root only: mounting needs
CAP_SYS_ADMIN) and checks the warning names its size and TGI's fix, while this machine's own
/dev/shm-sized tmpfs and NCCL_SHM_DISABLE=1 pass quietly. No GPU is needed: the check reads the
filesystem, and the hook is called as the server calls it, before any rank starts.
"""
from __future__ import annotations

import logging
import os
import subprocess

import pytest

from tgserve.backends.cuda import shm_check, torch_gpu
from tgserve.backends.cuda import plugin as cuda
from tgserve.backends.rocm import plugin as rocm


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of the given size under tmp_path; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    mounted = []

    def mount(size: str):
        path = tmp_path / f"shm-{size}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return str(path)
    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_a_container_default_shm_is_reported_with_the_fix(tmpfs):
    message = shm_check.shm_shortfall(tmpfs("64m"), environ={})
    assert "holds only 64 MiB" in message
    assert "docker run --shm-size 1g" in message and "NCCL_SHM_DISABLE=1" in message


def test_a_gigabyte_passes_and_nccl_shm_disabled_skips_the_check(tmpfs):
    assert shm_check.shm_shortfall(tmpfs("1g"), environ={}) is None
    assert shm_check.shm_shortfall(tmpfs("64m"), environ={"NCCL_SHM_DISABLE": "1"}) is None
    assert shm_check.shm_shortfall(tmpfs("32m"), environ={"NCCL_SHM_DISABLE": "0"}) is not None


def test_a_missing_shm_says_what_to_mount(tmp_path):
    message = shm_check.shm_shortfall(str(tmp_path / "absent"), environ={})
    assert "is not usable" in message and "--shm-size 1g" in message


def test_the_hook_warns_before_local_ranks_start_only(tmpfs, monkeypatch, caplog):
    """As the server calls it: ranks sharing one machine are checked; one rank per machine is not."""
    monkeypatch.setattr(shm_check, "SHM_PATH", tmpfs("64m"))
    monkeypatch.delenv("NCCL_SHM_DISABLE", raising=False)
    with caplog.at_level(logging.WARNING):
        torch_gpu.tgserve_on_sharding(world_size=2, num_local_ranks=1)
        assert not caplog.records
        cuda.tgserve_on_sharding(world_size=2, num_local_ranks=2)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "holds only 64 MiB" in caplog.records[0].getMessage()
    assert rocm.tgserve_on_sharding is cuda.tgserve_on_sharding  # RCCL has the same transport
