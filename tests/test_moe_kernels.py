"""MoE kernel backends (per expert: reference, cpu; xpu_onednn through the op emulator) against
the float64 oracle ``reference_moe``, and the stacked-experts helpers. No vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from vllm_int4xpu.errors import Int4FormatError  # noqa: E402
from vllm_int4xpu.kernels import Int4MoE, Int4MoESpec, select_moe_kernel  # noqa: E402
from vllm_int4xpu.weight import (Int4Experts, ZeroKind, concat_out_features, dequantize,  # noqa: E402
                                 quantize_rtn, reference_moe, with_zero_kind)

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def _experts(E, N, K, g, kind, seed, act_order=False):
    gen = torch.Generator().manual_seed(seed)
    ws = []
    for _ in range(E):
        w = quantize_rtn(torch.randn(N, K, generator=gen) * 0.1, g, kind,
                         scale_dtype=torch.float32)
        if act_order:  # a desc_act-style g_idx: groups scattered over K
            perm = torch.randperm(K, generator=gen)
            from dataclasses import replace
            w = replace(w, g_idx=(perm // w.group_size).to(torch.int32))
        ws.append(w)
    return Int4Experts.stack(ws)


def _routing(M, E, k, seed, skip_expert=None):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)])
    if skip_expert is not None:  # an expert that receives no token
        ids = torch.where(ids == skip_expert, (ids + 1) % E, ids)
        for r in range(M):  # keep the k experts of a token distinct
            if len(set(ids[r].tolist())) < k:
                ids[r] = torch.tensor([e for e in range(E) if e != skip_expert][:k])
    w = torch.rand(M, k, generator=gen)
    return w / w.sum(-1, keepdim=True), ids


def _rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


CASES = [  # (E, H, I, g13, g2, kind, top-k, M, act_order)
    (4, 128, 64, 32, 32, "int", 2, 5, False),
    (4, 128, 64, 64, 64, "float", 1, 3, False),
    (8, 256, 128, 128, 128, "none", 8, 4, False),
    (3, 96, 64, -1, -1, "int", 2, 6, False),  # per-channel, ragged H
    (4, 128, 64, 32, 32, "int", 2, 7, True),  # act-order
    (4, 128, 64, 32, 32, "float", 2, 130, False),  # many tokens: cpu's dense path
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "cpu_native"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_expert_backends_match_float64(backend, case, dtype):
    E, H, I, g13, g2, kind, k, M, act = case
    w13 = _experts(E, 2 * I, H, g13, kind, 1, act)
    w2 = _experts(E, H, I, g2, kind, 2, act)
    x = torch.randn(M, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    tw, ids = _routing(M, E, k, 4, skip_expert=E - 1 if E > k else None)
    ref = reference_moe(x, w13, w2, tw, ids)
    spec = Int4MoESpec.of(w13, w2, dtype, "cpu")
    ok, why = select_moe_kernel(spec, forced="reference").can_implement(spec)
    assert ok, why
    if backend != "reference":
        from vllm_int4xpu.kernels import moe_per_expert as mpe
        cls = mpe.CpuMoEKernel if backend == "cpu" else mpe.CpuNativeMoEKernel
        ok, why = cls.can_implement(spec)
        if not ok:
            pytest.skip(why)
    moe = Int4MoE(w13, w2, dtype, "cpu", backend=backend)
    y = moe(x, tw, ids)
    assert y.dtype == dtype and y.shape == x.shape
    assert _rel(y, ref) < TOL[dtype], (_rel(y, ref), backend, case)


def test_cpu_backend_refusal_names_the_reason():
    from vllm_int4xpu.kernels.moe_per_expert import CpuMoEKernel
    w13, w2 = _experts(2, 64, 128, 16, "int", 1), _experts(2, 128, 32, 16, "int", 2)
    ok, why = CpuMoEKernel.can_implement(Int4MoESpec.of(w13, w2, torch.bfloat16, "cpu"))
    assert not ok and "group size 16" in why, why
    # the native kernel takes group 16; a hidden size of 120 (K % 16) goes to reference
    assert select_moe_kernel(Int4MoESpec.of(w13, w2, torch.bfloat16, "cpu")).name == "cpu_native"
    w13, w2 = _experts(2, 64, 120, 8, "int", 1), _experts(2, 120, 32, 8, "int", 2)
    assert select_moe_kernel(Int4MoESpec.of(w13, w2, torch.bfloat16, "cpu")).name == "reference"


def test_forced_moe_backend_that_refuses_is_an_error(monkeypatch):
    w13, w2 = _experts(2, 64, 128, 16, "int", 1), _experts(2, 128, 32, 16, "int", 2)
    monkeypatch.setenv("VLLM_INT4XPU_MOE_BACKEND", "cpu")
    with pytest.raises(Int4FormatError, match="VLLM_INT4XPU_MOE_BACKEND"):
        select_moe_kernel(Int4MoESpec.of(w13, w2, torch.bfloat16, "cpu"))


def test_xpu_onednn_moe_through_the_op_emulator():
    """The per-expert oneDNN backend's real prepare/apply, with the XPU ops emulated on CPU
    (tests/xpu_emulator.py), float zero points through the exact correction."""
    from xpu_emulator import XpuOpEmulator
    from vllm_int4xpu.kernels.moe_per_expert import XpuOneDnnMoEKernel
    from vllm_int4xpu.kernels.xpu_onednn import use_ops
    for kind in ("int", "float"):
        w13, w2 = _experts(4, 128, 128, 32, kind, 5), _experts(4, 128, 64, 32, kind, 6)
        spec = Int4MoESpec.of(w13, w2, torch.bfloat16, "xpu")
        emu = XpuOpEmulator()
        with use_ops(emu.ops()):
            ok, why = XpuOneDnnMoEKernel.can_implement(spec)
            assert ok, why
            kern = XpuOneDnnMoEKernel(spec)
            prepared = kern.prepare(w13, w2)
            x = torch.randn(6, 128).to(torch.bfloat16)
            tw, ids = _routing(6, 4, 2, 7)
            y = kern.apply([prepared[n] for n in kern.tensor_names], x, tw, ids)
        assert _rel(y, reference_moe(x, w13, w2, tw, ids)) < TOL[torch.bfloat16]


def test_spec_key_round_trip():
    w13, w2 = _experts(3, 64, 96, 32, "float", 1, act_order=True), _experts(3, 96, 32, 32, "float", 2)
    spec = Int4MoESpec.of(w13, w2, torch.float16, "cuda", "gelu")
    assert Int4MoESpec.from_key(spec.key()) == spec


def test_stack_widens_zero_kinds_exactly():
    """Experts of one layer may load with different zero-point kinds (a GPTQ expert whose zero
    points are all 8 becomes symmetric): stacking widens them without changing any weight."""
    gen = torch.Generator().manual_seed(0)
    ws = [quantize_rtn(torch.randn(16, 64, generator=gen), 32, k, scale_dtype=torch.float32)
          for k in ("none", "int", "float")]
    st = Int4Experts.stack(ws)
    assert st.zero_kind == ZeroKind.FLOAT and st.zeros.dtype == torch.float32
    for e, w in enumerate(ws):
        torch.testing.assert_close(dequantize(st.expert(e), torch.float64),
                                   dequantize(w, torch.float64), rtol=0, atol=1e-6)
    st_int = Int4Experts.stack(ws[:2])
    assert st_int.zero_kind == ZeroKind.INT and st_int.zeros.dtype == torch.int8
    with pytest.raises(ValueError):
        with_zero_kind(ws[2], ZeroKind.INT)


def test_stack_refuses_mismatched_experts():
    a = quantize_rtn(torch.randn(16, 64), 32)
    b = quantize_rtn(torch.randn(16, 128), 32)
    with pytest.raises(Int4FormatError, match="experts of one projection"):
        Int4Experts.stack([a, b])


def test_concat_out_features_is_the_row_concatenation():
    gen = torch.Generator().manual_seed(1)
    g, u = (quantize_rtn(torch.randn(24, 64, generator=gen), 32, k, scale_dtype=torch.float32)
            for k in ("int", "float"))
    gu = concat_out_features([g, u])
    assert gu.out_features == 48
    torch.testing.assert_close(dequantize(gu, torch.float64),
                               torch.cat([dequantize(g, torch.float64), dequantize(u, torch.float64)]),
                               rtol=0, atol=1e-6)
    from dataclasses import replace
    g2 = replace(g, g_idx=(torch.randperm(64) // 32).to(torch.int32))
    with pytest.raises(Int4FormatError, match="different act-order"):
        concat_out_features([g2, u])
