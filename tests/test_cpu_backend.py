"""CPU and reference backends against the float64 oracle; the selector's choices and refusals."""

from __future__ import annotations

import logging

import pytest
import torch

from vllm_int4xpu.errors import Int4FormatError
from vllm_int4xpu.kernels import Int4Linear, Int4LinearSpec, select_kernel
from vllm_int4xpu.kernels import cpu as cpu_mod
from vllm_int4xpu.weight import ZeroKind, quantize_rtn, reference_linear

KINDS = [ZeroKind.NONE, ZeroKind.INT, ZeroKind.FLOAT]
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("backend", ["cpu_native", "cpu", "reference"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("M", [1, 5, 130])  # 130 takes the CPU backend's dense path
def test_backend_matches_float64(backend, kind, group, M):
    torch.manual_seed(group + M)
    N, K = 80, 512
    w = quantize_rtn(torch.randn(N, K), group, kind)
    lin = Int4Linear(w, torch.bfloat16, "cpu", backend=backend)
    assert lin.backend == backend
    x = torch.randn(M, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16)
    assert rel_err(lin(x, bias), reference_linear(x, w, bias)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [3, 129])
def test_cpu_backend_other_dtypes(dtype, M):
    torch.manual_seed(7)
    w = quantize_rtn(torch.randn(64, 256), 64, ZeroKind.INT, scale_dtype=dtype)
    lin = Int4Linear(w, dtype, "cpu", backend="cpu")
    x = torch.randn(M, 256, dtype=dtype)
    assert rel_err(lin(x), reference_linear(x, w)) < TOL[dtype]


@pytest.mark.parametrize("M", [2, 140])
def test_cpu_backend_act_order_and_3d_input(M):
    torch.manual_seed(8)
    w = quantize_rtn(torch.randn(48, 256), 64, ZeroKind.INT)
    w.g_idx = (torch.randperm(256) // 64).to(torch.int32)
    lin = Int4Linear(w, torch.float32, "cpu", backend="cpu")
    x = torch.randn(2, M, 256)
    y = lin(x)
    assert y.shape == (2, M, 48)
    assert rel_err(y.reshape(-1, 48), reference_linear(x.reshape(-1, 256), w)) < 1e-5


def test_a_wrong_zero_point_is_caught():
    """The oracle check fails if the backend mishandles zero points (test can fail)."""
    torch.manual_seed(9)
    w = quantize_rtn(torch.randn(32, 128), 32, ZeroKind.INT)
    lin = Int4Linear(w, torch.float32, "cpu", backend="cpu")
    w.zeros = (w.zeros + 1).clamp(max=15)
    x = torch.randn(4, 128)
    assert rel_err(lin(x), reference_linear(x, w)) > 1e-2


def test_selector_prefers_cpu_native_and_logs_refusals(caplog):
    w = quantize_rtn(torch.randn(64, 128), 64, ZeroKind.INT)
    spec = Int4LinearSpec.of(w, torch.bfloat16, "cpu")
    with caplog.at_level(logging.INFO, logger="vllm.int4xpu"):
        assert select_kernel(spec).name == "cpu_native"
    # K = 120 is outside the native kernel (K % 16) and a 120 group outside torch's op: reference
    w120 = quantize_rtn(torch.randn(64, 120), 120, ZeroKind.INT)
    spec120 = Int4LinearSpec.of(w120, torch.bfloat16, "cpu")
    with caplog.at_level(logging.INFO, logger="vllm.int4xpu"):
        assert select_kernel(spec120).name == "reference"
    assert any("reference" in r.message and "group size 120" in r.message
               and "K=120" in r.message for r in caplog.records)


def test_caller_choice_is_not_reported_as_the_env_override(monkeypatch, caplog):
    """selfcheck and benchmarks pick backends by argument: the log and errors must not claim the
    user set VLLM_INT4XPU_BACKEND."""
    import logging
    monkeypatch.delenv("VLLM_INT4XPU_BACKEND", raising=False)
    w = quantize_rtn(torch.randn(48, 128), 64, ZeroKind.INT)
    spec = Int4LinearSpec.of(w, torch.bfloat16, "cpu")
    with caplog.at_level(logging.INFO, logger="vllm.int4xpu"):
        assert select_kernel(spec, forced="reference").name == "reference"
    text = " ".join(r.message for r in caplog.records)
    assert "requested by the caller" in text and "VLLM_INT4XPU_BACKEND" not in text
    with pytest.raises(Int4FormatError, match="requested by the caller") as ei:
        select_kernel(spec, forced="xpu_onednn")
    assert "VLLM_INT4XPU_BACKEND" not in str(ei.value)


def test_env_override_forces_and_refuses(monkeypatch):
    w = quantize_rtn(torch.randn(64, 128), 64, ZeroKind.INT)
    spec = Int4LinearSpec.of(w, torch.bfloat16, "cpu")
    monkeypatch.setenv("VLLM_INT4XPU_BACKEND", "reference")
    assert select_kernel(spec).name == "reference"
    monkeypatch.setenv("VLLM_INT4XPU_BACKEND", "xpu_onednn")
    with pytest.raises(Int4FormatError, match="'xpu_onednn' .forced by VLLM_INT4XPU_BACKEND."):
        select_kernel(spec)
    monkeypatch.setenv("VLLM_INT4XPU_BACKEND", "nope")
    with pytest.raises(Int4FormatError, match="unknown kernel backend"):
        select_kernel(spec)


def test_cpu_refuses_n_not_multiple_of_16():
    spec = Int4LinearSpec(128, 24, 64, ZeroKind.INT, False, torch.bfloat16, "cpu")
    ok, why = cpu_mod.CpuKernel.can_implement(spec)
    assert not ok and "multiple of 16" in why


def test_custom_op_traces_under_torch_compile():
    """The custom op has a fake implementation, so torch.compile(fullgraph) traces through it."""
    torch.manual_seed(10)
    w = quantize_rtn(torch.randn(64, 128), 64, ZeroKind.FLOAT)
    lin = Int4Linear(w, torch.float32, "cpu", backend="cpu")
    f = torch.compile(lambda x: torch.relu(lin(x)) * 2, fullgraph=True, backend="eager")
    x = torch.randn(3, 128)
    assert torch.allclose(f(x), torch.relu(lin(x)) * 2)


def test_custom_op_passes_opcheck():
    """The dispatcher-registered op: schema, fake tensor, autograd registration and AOT dispatch
    agree with the real kernel (torch.library.opcheck)."""
    import vllm_int4xpu.kernels.ops  # noqa: F401  (registers torch.ops.int4xpu.linear)
    w = quantize_rtn(torch.randn(64, 128), 64, ZeroKind.INT)
    lin = Int4Linear(w, torch.float32, "cpu", backend="cpu")
    for x, bias in ((torch.randn(3, 128), None), (torch.randn(2, 5, 128), torch.randn(64))):
        res = torch.library.opcheck(torch.ops.int4xpu.linear.default,
                                    (x, list(lin.tensors), bias, lin.backend, lin.spec.key()))
        assert set(res.values()) == {"SUCCESS"}, res


def test_selector_sends_uneven_act_order_shards_to_reference(monkeypatch, caplog):
    """A row-parallel shard of an act-order layer (groups no permutation makes contiguous) is
    refused by every permuting backend, with the reason, and runs exactly on 'reference'."""
    from vllm_int4xpu.weight import Int4Weight, pack_int4, unpack_int4
    K, N, g = 256, 32, 32
    gen = torch.Generator().manual_seed(0)
    full = quantize_rtn(torch.randn(N, 2 * K), g, ZeroKind.INT)
    full_g_idx = (torch.randperm(2 * K, generator=gen) % (2 * K // g)).to(torch.int32)
    # the first rank's half of the input channels; scales/zeros of every group, ids from the
    # full table (as a GPTQ desc_act layer is split for row parallelism)
    shard = Int4Weight(pack_int4(unpack_int4(full.qweight)[:, :K]), full.scales, full.zeros,
                       ZeroKind.INT, g, K, N, full_g_idx[:K])
    spec = Int4LinearSpec.of(shard, torch.float32, "cpu")
    assert spec.uneven_act_order and Int4LinearSpec.from_key(spec.key()) == spec
    even = quantize_rtn(torch.randn(N, K), g, ZeroKind.INT)
    even.g_idx = (torch.randperm(K, generator=gen) % (K // g)).to(torch.int32)
    assert not Int4LinearSpec.of(even, torch.float32, "cpu").uneven_act_order
    with caplog.at_level(logging.INFO, logger="vllm.int4xpu"):
        assert select_kernel(spec).name == "reference"
    assert any("unevenly" in r.message for r in caplog.records)
    lin = Int4Linear(shard, torch.float32, "cpu")
    x = torch.randn(3, K)
    assert rel_err(lin(x), reference_linear(x, shard)) < 1e-5
    monkeypatch.setenv("VLLM_INT4XPU_BACKEND", "cpu")
    with pytest.raises(Int4FormatError, match="unevenly"):
        select_kernel(spec)
