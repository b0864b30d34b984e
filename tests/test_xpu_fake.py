"""The xpu_onednn backend's real op calls, checked with fake tensors on device "xpu" (CPU only).

The backend's own prepare/apply code runs on FakeTensors whose device is xpu; its op lookups are
pointed at the real aten ops (so torch's meta kernels, including the ``fake_device == "xpu"``
branch of ``_weight_int4pack_mm``, produce the outputs) wrapped in the argument checks the XPU
kernels make (tests/xpu_emulator.py: group size, [K/g, N] scales, int8 zeros, contiguity...), which
the meta kernels alone do not.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from vllm_int4xpu.kernels import Int4LinearSpec, check_backend
from vllm_int4xpu.kernels.xpu_onednn import (FLOAT_ZP_OP, INT_ZP_OP, XpuInt4Ops, XpuOneDnnKernel,
                                             use_ops)
from vllm_int4xpu.weight import ZeroKind, quantize_rtn

from xpu_emulator import check_float_zp_mm, check_int_zp_mm

K, N = 512, 96
XPU = torch.device("xpu")


def to_fake(mode, t):
    return None if t is None else FakeTensor(mode, t.to("meta"), XPU)


class CheckedAtenOps:
    """Real aten ops (meta kernels under fake mode) behind the XPU argument checks; logs calls."""

    def __init__(self, float_zp_m1_buggy=True):
        self.calls = []
        self.buggy = float_zp_m1_buggy

    def int_zp_mm(self, x, w, g, scale, zeros):
        check_int_zp_mm(x, w, g, scale, zeros)
        self.calls.append(("int", tuple(x.shape)))
        return getattr(torch.ops.aten, INT_ZP_OP)(x, w, g, scale, zeros)

    def float_zp_mm(self, x, w, g, sz):
        check_float_zp_mm(x, w, g, sz)
        self.calls.append(("float", tuple(x.shape)))
        return getattr(torch.ops.aten, FLOAT_ZP_OP)(x, w, g, sz)

    def ops(self):
        return XpuInt4Ops(self.int_zp_mm, self.float_zp_mm, self.buggy)


def make_weight(group, zero_kind, act_order, dtype):
    w = quantize_rtn(torch.randn(N, K), group, zero_kind, scale_dtype=dtype)
    if act_order:
        w.g_idx = (torch.randperm(K) // w.group_size).to(torch.int32)
    return w


CASES = [(g, z, a) for g in (32, 64, 128, 256, -1, 16) for z in ZeroKind for a in (False, True)
         if not (g == -1 and a) and not (g == 16 and z == ZeroKind.INT)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,zero_kind,act_order", CASES)
@pytest.mark.parametrize("m", [1, 4, 33])
def test_op_calls_on_fake_xpu(group, zero_kind, act_order, dtype, m):
    w = make_weight(group, zero_kind, act_order, dtype)
    spec = Int4LinearSpec.of(w, dtype, "xpu")
    checked = CheckedAtenOps()
    mode = FakeTensorMode()
    with use_ops(checked.ops()):
        ok, why = XpuOneDnnKernel.can_implement(spec)
        assert ok, why
        kernel = XpuOneDnnKernel(spec)
        if act_order:
            # The act-order permutation inspects g_idx values: prepare on real tensors, then move
            # the prepared tensors to (fake) xpu, as loading does.
            prepared = {k: to_fake(mode, v) for k, v in kernel.prepare(w).items()}
        else:
            fw = replace(w, qweight=to_fake(mode, w.qweight), scales=to_fake(mode, w.scales),
                         zeros=to_fake(mode, w.zeros))
            with mode:
                prepared = kernel.prepare(fw)
        for t in prepared.values():
            assert isinstance(t, FakeTensor) and t.device.type == "xpu"
        x = to_fake(mode, torch.randn(m, K, dtype=dtype))
        bias = to_fake(mode, torch.randn(N, dtype=dtype))
        with mode:
            y = kernel.apply([prepared[n] for n in kernel.tensor_names], x, bias)
    assert isinstance(y, FakeTensor) and y.device.type == "xpu"
    assert tuple(y.shape) == (m, N) and y.dtype == dtype
    if w.group_size == 16:
        assert checked.calls == [("float", (m, K))]
    else:
        assert checked.calls == [("int", (m, K))]


def test_native_float_path_pads_single_row_on_buggy_builds():
    from vllm_int4xpu.kernels.xpu_onednn import native_float_zp_mm
    mode = FakeTensorMode()
    w = make_weight(64, ZeroKind.FLOAT, False, torch.bfloat16)
    sz = torch.stack([w.scales, w.zeros.to(w.scales.dtype)], -1).contiguous()
    checked = CheckedAtenOps(float_zp_m1_buggy=True)
    x, qw, fsz = (to_fake(mode, t) for t in (torch.randn(1, K).bfloat16(), w.qweight, sz))
    with mode:
        y = native_float_zp_mm(checked.ops(), x, qw, 64, fsz)
    assert tuple(y.shape) == (1, N) and y.device.type == "xpu"
    assert checked.calls == [("float", (2, K))]


def spec_of(group=128, zero_kind=ZeroKind.INT, dtype=torch.bfloat16, device="xpu", k=K, n=N):
    return Int4LinearSpec(k, n, k if group == -1 else group, zero_kind, False, dtype, device)


@pytest.mark.parametrize("spec,needle", [
    (spec_of(device="cpu"), "needs an Intel GPU"),
    (spec_of(device="cuda"), "needs an Intel GPU"),
    (spec_of(dtype=torch.float32), "float16/bfloat16"),
    (spec_of(group=48, k=480), "multiple of 32"),
    (spec_of(group=16), "multiple of 32"),
    (spec_of(group=-1, k=520), "per-channel"),
    (spec_of(group=16, zero_kind=ZeroKind.FLOAT, n=40), "multiples of 16"),
])
def test_refusals_say_why(spec, needle):
    ok, why = XpuOneDnnKernel.can_implement(spec)
    assert not ok and needle in why
    ok2, why2 = check_backend("xpu_onednn", spec)
    assert not ok2 and needle in why2


def test_refuses_when_op_missing_from_build():
    with use_ops(XpuInt4Ops(None, None, True)):
        ok, why = XpuOneDnnKernel.can_implement(spec_of())
        assert not ok and INT_ZP_OP in why
        ok, why = XpuOneDnnKernel.can_implement(spec_of(group=16, zero_kind=ZeroKind.NONE))
        assert not ok and FLOAT_ZP_OP in why


def test_accepts_supported_specs():
    for spec in (spec_of(), spec_of(group=-1), spec_of(group=32, zero_kind=ZeroKind.FLOAT),
                 spec_of(group=16, zero_kind=ZeroKind.NONE, dtype=torch.float16)):
        assert XpuOneDnnKernel.can_implement(spec) == (True, None)
