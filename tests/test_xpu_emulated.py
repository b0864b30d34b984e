"""The xpu_onednn backend's whole path, numerically, on CPU with emulated XPU ops.

The emulator (tests/xpu_emulator.py) implements the two aten ops from their documented contract;
the backend's real prepare/apply code runs against it and must match the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from vllm_int4xpu.kernels import Int4Linear, Int4LinearSpec
from vllm_int4xpu.kernels.float_zero import (add_float_zero_correction, float_zero_correction,
                                             group_sums, prepare_float_zeros)
from vllm_int4xpu.kernels.xpu_onednn import (XpuOneDnnKernel, float_zp_m1_bug_expected,
                                             native_float_zp_mm, use_ops)
from vllm_int4xpu.weight import ZeroKind, quantize_rtn, reference_linear

from xpu_emulator import OpContractError, XpuOpEmulator, check_int_zp_mm

K, N = 256, 64
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_weight(group, zero_kind, act_order, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(N, K, generator=gen)
    w = quantize_rtn(dense, group, zero_kind, scale_dtype=dtype)
    if act_order:
        w.g_idx = (torch.randperm(K, generator=gen) // w.group_size).to(torch.int32)
    return w


def run_backend(w, x, dtype, bias=None, emu=None):
    emu = emu or XpuOpEmulator()
    spec = Int4LinearSpec.of(w, dtype, "xpu")
    with use_ops(emu.ops()):
        ok, why = XpuOneDnnKernel.can_implement(spec)
        assert ok, why
        kernel = XpuOneDnnKernel(spec)
        prepared = kernel.prepare(w)
        y = kernel.apply([prepared[n] for n in kernel.tensor_names], x, bias)
    return y, emu


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


CASES = [(g, z, a) for g in (32, 64, 128, -1, 16) for z in ZeroKind for a in (False, True)
         if not (g == -1 and a) and not (g == 16 and z == ZeroKind.INT)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,zero_kind,act_order", CASES)
@pytest.mark.parametrize("m", [1, 5])
def test_backend_matches_float64_reference(group, zero_kind, act_order, dtype, m):
    w = make_weight(group, zero_kind, act_order, dtype)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(N).to(dtype)
    y, emu = run_backend(w, x, dtype, bias)
    assert y.shape == (m, N) and y.dtype == dtype
    assert rel_err(y, reference_linear(x, w, bias)) < TOL[dtype]
    # Float zeros with g % 32 == 0 must take the fast integer op + correction, never the slow one.
    expected = "float_zp_mm" if w.group_size == 16 else "int_zp_mm"
    assert emu.op_names() == [expected]


def test_through_int4_linear_custom_op():
    w = make_weight(64, ZeroKind.FLOAT, True, torch.bfloat16)
    x = torch.randn(3, 7, K).to(torch.bfloat16)
    emu = XpuOpEmulator()
    with use_ops(emu.ops()):
        layer = Int4Linear(w, torch.bfloat16, "xpu")  # the selector must pick xpu_onednn
        assert layer.backend == "xpu_onednn"
        y = layer(x)
    assert y.shape == (3, 7, N)
    assert rel_err(y.reshape(-1, N), reference_linear(x.reshape(-1, K), w)) < TOL[torch.bfloat16]
    assert emu.op_names() == ["int_zp_mm"]


@pytest.mark.parametrize("group", [32, 128, -1])
def test_correction_is_exact_in_float64(group):
    """int kernel (zp = 8) + group_sums(x) @ Z == float-zero reference, to float64 rounding."""
    w = make_weight(group, ZeroKind.FLOAT, False, torch.float64)
    x = torch.randn(9, K, dtype=torch.float64)
    emu = XpuOpEmulator(allow_float64=True)
    prep = prepare_float_zeros(w, zeros_dtype=torch.float64)
    y_int = emu.int_zp_mm(x, w.qweight, w.group_size, w.scales, prep.int_zeros)
    y = y_int + float_zero_correction(x, prep.float_zeros, w.group_size)
    ref = reference_linear(x, w)
    assert rel_err(y, ref) < 1e-12
    assert rel_err(add_float_zero_correction(y_int, x, prep.float_zeros, w.group_size), ref) < 1e-12
    # and the correction is not a no-op: without it the answer is far off
    assert rel_err(y_int, ref) > 1e-2


def test_group_sums_shape_and_value():
    x = torch.arange(12.0).view(2, 6)
    assert group_sums(x, 3).tolist() == [[3.0, 12.0], [21.0, 30.0]]


@pytest.mark.parametrize("group", [64, 128])
def test_m1_bug_guard(group):
    """On builds flagged buggy, M = 1 with g > 32 never reaches the op's broken M = 1 kernel."""
    torch.manual_seed(group)
    w = make_weight(group, ZeroKind.FLOAT, False, torch.bfloat16)
    # Build the op's scale_and_zero input directly (the backend only uses it at g = 16).
    sz = torch.stack([w.scales, w.zeros.to(torch.bfloat16)], -1).contiguous()
    x = torch.randn(1, K).to(torch.bfloat16)
    ref = reference_linear(x, w)
    emu = XpuOpEmulator(m1_bug=True)
    y_guarded = native_float_zp_mm(emu.ops(float_zp_m1_buggy=True), x, w.qweight, group, sz)
    assert rel_err(y_guarded, ref) < TOL[torch.bfloat16]
    assert emu.calls[-1][1]["x"][0][0] == 2  # padded to two rows
    y_bad = native_float_zp_mm(emu.ops(float_zp_m1_buggy=False), x, w.qweight, group, sz)
    assert rel_err(y_bad, ref) > 0.05  # the emulated bug is real, so the guard matters


def test_m1_bug_version_rule():
    assert float_zp_m1_bug_expected("2.13.0+xpu")
    assert float_zp_m1_bug_expected("2.10.0")
    assert not float_zp_m1_bug_expected("2.14.0+xpu")


def test_emulator_rejects_what_the_op_rejects():
    w = make_weight(32, ZeroKind.INT, False, torch.bfloat16)
    x = torch.randn(2, K).to(torch.bfloat16)
    with pytest.raises(OpContractError):  # float32 activations
        check_int_zp_mm(x.float(), w.qweight, 32, w.scales, w.zeros)
    with pytest.raises(OpContractError):  # zero points as int32
        check_int_zp_mm(x, w.qweight, 32, w.scales, w.zeros.to(torch.int32))
    with pytest.raises(OpContractError):  # group 16
        check_int_zp_mm(x, w.qweight, 16, w.scales, w.zeros)
    with pytest.raises(OpContractError):  # transposed scales
        check_int_zp_mm(x, w.qweight, 32, w.scales.t(), w.zeros)


# ---------------------------------------------------------------- optional backends
@pytest.mark.parametrize("group,zero_kind,act_order",
                         [(g, z, a) for g in (32, 128, -1) for z in ZeroKind for a in (False, True)
                          if not (g == -1 and a)])
@pytest.mark.parametrize("m", [1, 6])
def test_vllm_xpu_kernels_backend_emulated(group, zero_kind, act_order, m):
    from vllm_int4xpu.kernels.xpu_vllm_kernels import XpuVllmKernelsKernel, use_op
    from xpu_emulator import emulate_int4_gemm_w4a16

    dtype = torch.bfloat16
    w = make_weight(group, zero_kind, act_order, dtype)
    x = torch.randn(m, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    spec = Int4LinearSpec.of(w, dtype, "xpu")
    with use_op(emulate_int4_gemm_w4a16):
        assert XpuVllmKernelsKernel.can_implement(spec) == (True, None)
        kernel = XpuVllmKernelsKernel(spec)
        prepared = kernel.prepare(w)
        y = kernel.apply([prepared[n] for n in kernel.tensor_names], x, bias)
    assert rel_err(y, reference_linear(x, w, bias)) < TOL[dtype]


def test_optional_backends_refuse_cleanly_here():
    from vllm_int4xpu.kernels import check_backend

    for name in ("xpu_vllm_kernels", "ipex"):
        spec = Int4LinearSpec(K, N, 128, ZeroKind.NONE, False, torch.bfloat16, "cpu")
        ok, why = check_backend(name, spec)
        assert not ok and "needs an Intel GPU" in why
        # on "xpu" they refuse because their package is absent/incompatible, never crash
        ok, why = check_backend(name, Int4LinearSpec(K, N, 128, ZeroKind.NONE, False,
                                                     torch.bfloat16, "xpu"))
        assert not ok and why
