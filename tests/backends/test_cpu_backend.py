"""The cpu backend: oneDNN-packed linear layers against `F.linear`, threads, dtype, memory, and the
ISA it runs (detected, or forced down to the portable AVX2 path by TGSERVE_CPU_ISA=avx2).

A fast path tied to an ISA is tested where the CPU has it; where it does not, the same test checks
the path that runs instead, so both CPU kinds run every correctness check.
"""
from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from tgserve.api import cli
from tgserve.backends.cpu import host, kernels, plugin
from tgserve.backends.cpu.kernels import CpuIsaError, choose_kernels
from tgserve.core.quantization.quant_config import resolve_quantization
from tgserve.backends.cpu.linear import OneDnnLinearMethod
from tgserve.backends.cpu.native_bf16_linear import NativeBf16LinearMethod
from tgserve.core.config import ServerConfig
from tgserve.core.layers.linear import Linear, LinearMethod, linear_from_dense
from tgserve.core.plugins import BackendRegistry

from ..core.engine_harness import request, run_all, running_engine

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without mkldnn")
# fp32: oneDNN and F.linear sum in a different order; bf16: each rounds its output to 8 mantissa bits.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}
# Facts (CPU flags, torch capability, oneDNN linear ops, oneDNN bf16) of the CPU kinds users have.
ZEN3 = ({"avx2", "fma", "f16c"}, "AVX2", True, False)  # AVX2 only: oneDNN has no bf16 path
ZEN5 = ({"avx2", "avx512f", "avx512bw", "avx512_bf16"}, "AVX512", True, True)
SAPPHIRE_RAPIDS = ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512", True, True)
SKYLAKE_X = ({"avx2", "avx512f", "avx512bw"}, "AVX512", True, True)  # oneDNN emulates bf16, no native dot
SAPPHIRE_RAPIDS_ONEDNN_AVX2 = ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512", True, False)
# Where oneDNN has no bf16 path, bf16 linears run the native bf16 GEMM if it builds here (a compiler), else F.linear.
HAS_COMPILER = shutil.which("c++") is not None
ENGINE_LIMITS = dict(max_batch_prefill_tokens=32, max_batch_total_tokens=512, max_total_tokens=128)


def make_linear_method(dtype, quantize=None):
    return plugin.tgserve_make_linear_method(quantize=quantize, quantization=None, dtype=dtype, device=torch.device("cpu"))


@pytest.fixture
def cpu_isa(monkeypatch):
    """`cpu_isa("avx2")` sets TGSERVE_CPU_ISA (None unsets it) and makes the plugin decide again."""

    def set_isa(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("TGSERVE_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("TGSERVE_CPU_ISA", value)
        plugin.cpu_kernels.cache_clear()

    yield set_isa
    plugin.cpu_kernels.cache_clear()  # the next caller decides from the restored environment


def onednn_packs(dtype) -> bool:
    """Whether oneDNN packs a `dtype` weight on this CPU, found by trying (not by asking the plugin)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 1)
    except RuntimeError:  # e.g. bf16 on AVX2-only CPUs: "bf16 path needs the cpu support ..."
        return False
    return True


def expected_method_type(dtype) -> type:
    """The linear method the cpu backend should give for `dtype` here: oneDNN-packed where it runs, the native
    bf16 GEMM for bf16 where oneDNN has no bf16 path (AVX2-only, or forced so), else F.linear."""
    is_forced_portable = os.environ.get("TGSERVE_CPU_ISA", "auto").lower() == "avx2"
    if dtype == torch.bfloat16 and (is_forced_portable or not onednn_packs(dtype)):
        return NativeBf16LinearMethod if HAS_COMPILER else LinearMethod
    return OneDnnLinearMethod if onednn_packs(dtype) else LinearMethod


@pytest.fixture(scope="module")
def active_hook():
    return BackendRegistry().select("cpu").hook


def method_here(active_hook, dtype) -> LinearMethod:
    """The method the selected cpu backend (plus the core's default) gives: what a server would run."""
    method = active_hook.tgserve_make_linear_method(quantize=None, quantization=None, dtype=dtype, device=torch.device("cpu"))
    assert type(method) is expected_method_type(dtype)
    return method


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading_shape", [(1,), (7,), (64,), (2, 5), (1, 1)], ids=str)
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_method_here_matches_f_linear(active_hook, dtype, leading_shape, has_bias):
    generator = torch.Generator().manual_seed(sum(leading_shape))
    weight = torch.randn(320, 96, generator=generator).to(dtype)
    bias = torch.randn(320, generator=generator).to(dtype) if has_bias else None
    x = torch.randn(*leading_shape, 96, generator=generator).to(dtype)
    method = method_here(active_hook, dtype)

    with torch.inference_mode():
        y = linear_from_dense(method, weight, bias)(x)
        expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double()).to(dtype)
    assert y.shape == (*leading_shape, 320) and y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOLERANCES[dtype])


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_weight_serves_every_batch_size_with_one_prepare(active_hook, dtype):
    weight = torch.randn(256, 64).to(dtype)
    method = method_here(active_hook, dtype)
    layer = linear_from_dense(method, weight)  # prepared (packed) once
    for num_tokens in (1, 7, 64, 0):
        x = torch.randn(num_tokens, 64).to(dtype)
        expected = F.linear(x.double(), weight.double()).to(dtype)
        torch.testing.assert_close(layer(x), expected, **TOLERANCES[dtype])


@needs_mkldnn
@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_dtype_may_be_named(name):
    expected = expected_method_type(getattr(torch, name))
    assert type(make_linear_method(name) or LinearMethod()) is expected


def test_reference_method_for_float16():
    assert make_linear_method(torch.float16) is None


def test_quantized_formats_keep_the_onednn_method_for_float_layers():
    quantization = resolve_quantization("eetq", {})
    method = plugin.tgserve_make_linear_method(quantize="eetq", quantization=quantization, dtype=torch.float32,
                                               device=torch.device("cpu"))
    assert method.name == "eetq" and type(method.dense) is expected_method_type(torch.float32)


def test_falls_back_to_core_method_without_mkldnn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert make_linear_method(torch.bfloat16) is None
    active = BackendRegistry().select("cpu")
    method = active.hook.tgserve_make_linear_method(quantize=None, quantization=None, dtype=torch.bfloat16, device=torch.device("cpu"))
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
    assert plugin.tgserve_get_block_size() == 16


@pytest.mark.parametrize("facts, isa, dtype", [(ZEN3, "avx2", "float32"), (ZEN5, "avx512_bf16", "bfloat16"),
                                               (SAPPHIRE_RAPIDS, "amx_bf16", "bfloat16"),
                                               (SKYLAKE_X, "avx512f", "float32"),
                                               (SAPPHIRE_RAPIDS_ONEDNN_AVX2, "amx_bf16", "float32")],
                         ids=["zen3", "zen5", "sapphire-rapids", "skylake-x", "sapphire-rapids-onednn-avx2"])
def test_default_dtype_is_bf16_only_with_native_bf16_and_packed_bf16(facts, isa, dtype):
    chosen = choose_kernels("auto", *facts)
    assert (chosen.isa, chosen.default_dtype, chosen.is_forced_portable) == (isa, dtype, False)
    assert chosen.allows_onednn(torch.float32)
    assert chosen.allows_onednn(torch.bfloat16) == facts[3]  # never tries the reorder that raises
    assert not chosen.allows_onednn(torch.float16)


@pytest.mark.parametrize("facts", [ZEN3, ZEN5, SAPPHIRE_RAPIDS, SKYLAKE_X], ids=["zen3", "zen5", "spr", "skx"])
@pytest.mark.parametrize("requested", ["avx2", "AVX2", " avx2 "])
def test_forced_avx2_runs_as_an_avx2_only_cpu_on_every_kind(facts, requested):
    zen3 = choose_kernels("auto", *ZEN3)
    forced = choose_kernels(requested, *facts)
    assert forced.is_forced_portable and forced.cpu_isa == host.best_isa(facts[0])
    assert (forced.isa, forced.default_dtype, forced.is_native_bf16) == (zen3.isa, zen3.default_dtype, False)
    assert (forced.allows_onednn(torch.float32), forced.allows_onednn(torch.bfloat16)) == (True, False)
    assert dict(forced.describe())["portable path forced"].startswith("yes")


@pytest.mark.parametrize("requested", ["", "auto", "AUTO"])
def test_auto_and_empty_detect(requested):
    assert choose_kernels(requested, *ZEN5) == choose_kernels("auto", *ZEN5)
    assert not choose_kernels(requested, *ZEN5).is_forced_portable


def test_without_cpuinfo_onednn_decides_native_bf16():
    assert choose_kernels("auto", set(), "AVX512", True, True).default_dtype == "bfloat16"
    assert choose_kernels("auto", set(), "DEFAULT", True, False).default_dtype == "float32"
    assert choose_kernels("avx2", set(), "AVX2", True, True).default_dtype == "float32"  # trusts the user


@pytest.mark.parametrize("requested, facts, message", [
    ("avx512", ZEN5, "TGSERVE_CPU_ISA must be one of auto, avx2. Given: avx512"),
    ("avx2", ({"asimd", "bf16"}, "SVE256", True, True), "TGSERVE_CPU_ISA=avx2, but this CPU has no AVX2"),
])
def test_isa_that_cannot_be_forced_is_refused(requested, facts, message):
    with pytest.raises(CpuIsaError, match=message):
        choose_kernels(requested, *facts)


def test_bad_isa_makes_the_backend_unusable_with_the_reason(cpu_isa):
    cpu_isa("avx512")
    status = plugin.tgserve_get_backend_status()
    assert not status.is_usable and "TGSERVE_CPU_ISA must be one of auto, avx2" in status.reason
    with pytest.raises(Exception, match="TGSERVE_CPU_ISA must be one of auto, avx2. Given: avx512"):
        BackendRegistry().select("cpu")


def test_hooks_follow_the_host(monkeypatch, cpu_isa):
    cpu_isa(None)
    monkeypatch.setattr(host, "cpu_flags", lambda: ZEN3[0])
    monkeypatch.setattr(kernels, "_onednn_has_bf16", lambda: False)
    assert plugin.tgserve_get_default_dtype() == "float32"
    # The native bf16 GEMM (F.linear without a compiler), not the reorder that raises there.
    assert type(make_linear_method(torch.bfloat16) or LinearMethod()) is (
        NativeBf16LinearMethod if HAS_COMPILER else LinearMethod)
    plugin.cpu_kernels.cache_clear()
    monkeypatch.setattr(host, "cpu_flags", lambda: SAPPHIRE_RAPIDS[0])
    monkeypatch.setattr(kernels, "_onednn_has_bf16", lambda: True)
    assert plugin.tgserve_get_default_dtype() == "bfloat16"


def test_default_dtype_here_is_the_fastest_correct_one():
    """Checked against the hardware itself: bf16 exactly where native bf16 and packed bf16 both run."""
    is_forced_portable = os.environ.get("TGSERVE_CPU_ISA", "auto").lower() == "avx2"
    is_bf16_fast = (host.has_native_bf16(host.cpu_flags()) and torch.backends.mkldnn.is_available()
                    and onednn_packs(torch.bfloat16) and not is_forced_portable)
    assert plugin.tgserve_get_default_dtype() == ("bfloat16" if is_bf16_fast else "float32")


def test_forced_avx2_takes_the_portable_path_here(cpu_isa):
    cpu_isa("avx2")
    assert plugin.tgserve_get_default_dtype() == "float32"
    assert type(make_linear_method(torch.bfloat16) or LinearMethod()) is expected_method_type(torch.bfloat16)
    assert type(make_linear_method(torch.float32)) is expected_method_type(torch.float32)
    status = plugin.tgserve_get_backend_status()
    assert status.is_usable and status.device_name.endswith("avx2, portable path forced)")
    details = dict(status.details)
    assert details["kernel ISA"] == "avx2" and details["native bf16"] == "no"
    assert details["oneDNN packed bf16 linears"].startswith("off") and details["default dtype"] == "float32"
    assert details["torch CPU capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("capability, has_onednn_bf16, warns", [
    ("AVX512", True, True), ("AVX512", False, True), ("AVX2", True, True), ("AVX2", False, False)])
def test_forced_avx2_says_what_torch_still_runs_above_it(monkeypatch, cpu_isa, caplog, restore_threads,
                                                         capability, has_onednn_bf16, warns):
    cpu_isa("avx2")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(kernels, "_onednn_has_bf16", lambda: has_onednn_bf16)
    with caplog.at_level(logging.INFO):
        plugin.tgserve_on_startup(config=ServerConfig())
    assert any("CPU kernels: kernel ISA avx2; portable path forced yes" in r.getMessage() for r in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == warns
    if warns:
        assert f"still run {capability}" in warnings[0]
        assert "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" in warnings[0]


SLOW_BF16 = "bfloat16 runs through a slower path on this CPU"


@pytest.mark.parametrize("facts, dtype, num_lines", [
    (ZEN3, torch.bfloat16, 1 - HAS_COMPILER), (ZEN3, "bfloat16", 1 - HAS_COMPILER), (SKYLAKE_X, torch.bfloat16, 1),
    (SAPPHIRE_RAPIDS_ONEDNN_AVX2, torch.bfloat16, 1 - HAS_COMPILER),
    (ZEN3, torch.float32, 0), (ZEN5, torch.bfloat16, 0), (SAPPHIRE_RAPIDS, torch.bfloat16, 0)])
def test_bf16_without_a_fast_path_says_so_in_one_line(monkeypatch, cpu_isa, caplog, facts, dtype, num_lines):
    cpu_isa(None)
    monkeypatch.setattr(host, "cpu_flags", lambda: facts[0])
    monkeypatch.setattr(kernels, "_onednn_has_bf16", lambda: facts[3])
    with caplog.at_level(logging.INFO):
        make_linear_method(dtype)
    lines = [record for record in caplog.records if SLOW_BF16 in record.getMessage()]
    assert len(lines) == num_lines
    if lines:
        assert lines[0].levelno == logging.WARNING and "use --dtype float32 instead" in lines[0].getMessage()


def test_backends_command_names_the_isa_and_fast_paths(cpu_isa, capsys):
    cpu_isa(None)
    assert cli.main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}  # as the e2e tests parse the table
    assert rows["cpu"][:2] == ["cpu", "yes"]
    details = dict(line[len("cpu: "):].split("  ", 1) for line in lines if line.startswith("cpu: "))
    details = {what.strip(): state.strip() for what, state in details.items()}
    assert details["kernel ISA"] == host.best_isa(host.cpu_flags())
    assert details["torch CPU capability"] == torch.backends.cpu.get_cpu_capability()
    assert details["oneDNN packed fp32 linears"] == ("on" if onednn_packs(torch.float32) else "off")
    assert details["oneDNN packed bf16 linears"] == ("on" if onednn_packs(torch.bfloat16) else "off")
    assert details["native bf16"] == ("yes" if host.has_native_bf16(host.cpu_flags()) else "no")
    assert details["portable path forced"].startswith("no")
    assert details["default dtype"] == plugin.tgserve_get_default_dtype()

    cpu_isa("avx2")
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "cpu (" in out and "avx2, portable path forced)" in out
    assert "cpu: portable path forced        yes (TGSERVE_CPU_ISA=avx2" in out
    assert "cpu: native bf16                 no" in out


def linear_method_types(engine) -> set[type]:
    return {type(module.method) for module in engine.runner.model.modules() if isinstance(module, Linear)}


def test_forced_portable_engine_serves_float32_by_default(cpu_isa, demo_model_dir, caplog):
    cpu_isa("avx2")
    with caplog.at_level(logging.INFO), running_engine(demo_model_dir, **ENGINE_LIMITS) as engine:
        (got,) = run_all(engine, [request([1, 2, 3, 4, 5], 8)])
        assert engine.model_info.model_dtype == "float32"
        assert linear_method_types(engine) == {expected_method_type(torch.float32)}
    assert len(got.ids) == 8
    assert not [record for record in caplog.records if SLOW_BF16 in record.getMessage()]
    assert any("CPU kernels: kernel ISA avx2; portable path forced yes" in r.getMessage() for r in caplog.records)


def test_forced_portable_engine_runs_bfloat16_through_the_native_gemm_and_says_so_once(cpu_isa, demo_model_dir,
                                                                                      caplog):
    cpu_isa("avx2")
    prompt = [1, 2, 3, 4, 5]
    with caplog.at_level(logging.INFO), running_engine(demo_model_dir, dtype="bfloat16", **ENGINE_LIMITS) as engine:
        (got,) = run_all(engine, [request(prompt, 8)])
        assert engine.model_info.model_dtype == "bfloat16"
        assert linear_method_types(engine) == {expected_method_type(torch.bfloat16)}  # no oneDNN bf16 assumed
    native = [record for record in caplog.records if "bfloat16 linears on this CPU (avx2" in record.getMessage()]
    slow = [record for record in caplog.records if SLOW_BF16 in record.getMessage()]
    assert (len(native), len(slow)) == ((1, 0) if HAS_COMPILER else (0, 1))
    assert len(got.ids) == 8 and got.finish is not None


def test_free_memory_is_a_conservative_share_of_available():
    free_bytes = plugin.tgserve_get_free_memory_bytes(device=torch.device("cpu"))
    assert 0 < free_bytes <= host.available_memory_bytes() * 0.51
