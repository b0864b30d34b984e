"""The project's own CPU kernel (``kernels/cpu_native.py``, ``csrc/int4_cpu.cpp``) against the
float64 oracle: both zero-point kinds and symmetric, every group size (the AMX path takes bf16
with groups of 32k, the AVX512-BF16 dot-product path bf16 otherwise and every bf16 M below the
dense path without AMX, the FMA path fp16/fp32), per-channel, ragged M (row blocks of 8 and 16)
and N (blocks of 16 channels), three activation dtypes, act-order; every path against the
others; the C++ torch op layers call (``int4xpu::cpu_native_mm``) against the Python path; and
the fallback when a library cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from vllm_int4xpu.kernels import Int4Linear, Int4LinearSpec, select_kernel
from vllm_int4xpu.kernels import cpu_native
from vllm_int4xpu.kernels.ops import int4_linear
from vllm_int4xpu.weight import ZeroKind, quantize_rtn, reference_linear

KINDS = [ZeroKind.NONE, ZeroKind.INT, ZeroKind.FLOAT]
TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}

if cpu_native.load_library()[0] is None:  # pragma: no cover - needs a C++ compiler
    pytest.skip(f"native CPU kernel unavailable: {cpu_native.load_library()[1]}",
                allow_module_level=True)


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def run(w, x, dtype, bias=None):
    lin = Int4Linear(w, dtype, "cpu", backend="cpu_native")
    assert lin.backend == "cpu_native"
    return lin(x, bias)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [16, 32, 48, 64, 128, 256, -1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_float64_every_group_and_kind(kind, group, dtype):
    K = 768 if group != 48 else 528
    N = 83  # odd: the last output channel runs alone
    torch.manual_seed(abs(group) * 3 + len(kind.value))
    w = quantize_rtn(torch.randn(N, K) * 0.05, group, kind, scale_dtype=dtype
                     if dtype != torch.float32 else torch.bfloat16)
    bias = torch.randn(N, dtype=dtype)
    # row blocks of 8/16 and a ragged tail; from DP_DENSE_MIN_M_SMALL rows bf16 takes the
    # dequantize + GEMM path (fp16/fp32 stay on the FMA path: test_fp16_fp32_dense_path)
    for M in (1, 2, 3, 4, 5, 9, 15, 16, 17, 41, cpu_native.DENSE_MIN_M, 70,
              cpu_native.DP_DENSE_MIN_M_SMALL):
        x = torch.randn(M, K, dtype=dtype)
        err = rel_err(run(w, x, dtype, bias), reference_linear(x.double(), w, bias.double()))
        assert err < TOL[dtype], (M, err)


@pytest.mark.parametrize("M", [1, 7, 40])
def test_act_order_and_3d_input(M):
    torch.manual_seed(5)
    w = quantize_rtn(torch.randn(48, 256), 64, ZeroKind.INT)
    w.g_idx = (torch.randperm(256) // 64).to(torch.int32)
    x = torch.randn(2, M, 256, dtype=torch.bfloat16)
    y = run(w, x, torch.bfloat16)
    assert y.shape == (2, M, 48)
    assert rel_err(y.reshape(-1, 48), reference_linear(x.reshape(-1, 256).double(), w)) < 8e-3


@pytest.mark.parametrize("M", [1, 3, 4, 6, 37, 70])
def test_every_path_matches(monkeypatch, M):
    """bf16 activations through each path (register dot products, AMX with per-group scaling,
    AMX on dequantized tiles, dot products for every M without AMX, AVX-512 FMAs): each against
    float64, and against each other up to fp32 summation order and the bf16 rounding of the
    dequantized tiles (paths this CPU lacks fall through to the next one built in)."""
    torch.manual_seed(6)
    w = quantize_rtn(torch.randn(100, 256), 32, ZeroKind.FLOAT)
    x = torch.randn(M, 256, dtype=torch.bfloat16)
    ref = reference_linear(x.double(), w)
    outs = {}
    for name, dp, dense, amx in (("dp", 8, 10**6, True), ("amx", 0, 10**6, True),
                                 ("amx_dense", 0, 1, True), ("dp_no_amx", 0, 10**6, False),
                                 ("fma", -1, 10**6, False)):
        monkeypatch.setattr(cpu_native, "DP_MAX_M", dp)
        monkeypatch.setattr(cpu_native, "AMX_DENSE_MIN_M", dense)
        monkeypatch.setattr(cpu_native, "DENSE_MIN_M", 10**6)
        monkeypatch.setattr(cpu_native, "DP_DENSE_MIN_M", 10**6)
        monkeypatch.setattr(cpu_native, "DP_DENSE_MIN_M_SMALL", 10**6)
        monkeypatch.setattr(cpu_native, "amx_enabled", lambda amx=amx: amx)
        outs[name] = run(w, x, torch.bfloat16)
        assert rel_err(outs[name], ref) < 8e-3, name
    for name, y in outs.items():
        assert rel_err(y, outs["fma"].double()) < 8e-3, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_fp32_dense_path(monkeypatch, dtype):
    """fp16/fp32 x on the dense path (FMA_DENSE_MIN_M; fp16 multiplies fp32 weights in fp32)
    against float64 and against the FMA path."""
    torch.manual_seed(8)
    w = quantize_rtn(torch.randn(72, 320) * 0.05, 64, ZeroKind.INT, scale_dtype=torch.bfloat16)
    x = torch.randn(70, 320, dtype=dtype)
    ref = reference_linear(x.double(), w)
    outs = {}
    for name, dense in (("dense", 1), ("fma", 0)):
        monkeypatch.setattr(cpu_native, "FMA_DENSE_MIN_M", dense)
        monkeypatch.setattr(cpu_native, "DENSE_MIN_M", dense)
        outs[name] = run(w, x, dtype)
        assert outs[name].dtype == dtype
        assert rel_err(outs[name], ref) < TOL[dtype], name
    assert rel_err(outs["dense"], outs["fma"].double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 70])
def test_outputs_rounded_as_torch_rounds(dtype, M):
    """The kernel's own rounding of its fp32 results into bf16/fp16 y (vector stores, masked
    for the last block of a ragged N) equals torch's rounding of the same fp32 results, bit
    for bit, overflow to inf in fp16 included."""
    lib, _ = cpu_native.load_library()
    torch.manual_seed(9)
    K, N, g = 256, 83, 64
    w = quantize_rtn(torch.randn(N, K), g, ZeroKind.INT)
    kern = cpu_native.CpuNativeKernel(Int4LinearSpec.of(w, dtype, "cpu"))
    qb, sb, _ = (kern.prepare(w)[n] for n in kern.tensor_names)
    x = torch.randn(M, K, dtype=dtype) * torch.logspace(-3, 4, M).to(dtype)[:, None]
    ys = {}
    for y_dtype in (torch.float32, dtype):
        y = torch.full((M * N + 16,), 7.0, dtype=y_dtype)  # a guard past y, left alone
        rc = lib.int4_gemm(x.data_ptr(), cpu_native._DT[dtype], M, K, qb.data_ptr(),
                           sb.data_ptr(), N, g, y.data_ptr(), cpu_native._DT[y_dtype], 0, 0, -1,
                           torch.get_num_threads())
        assert rc == 0
        assert (y[M * N:] == 7).all()
        ys[y_dtype] = y[:M * N].view(M, N)
    assert torch.equal(ys[dtype], ys[torch.float32].to(dtype))
    if dtype == torch.float16 and M > 1:
        assert ys[dtype].isinf().any()  # the largest rows overflow fp16


def test_a_wrong_offset_is_caught():
    """The oracle check has teeth: one zero point off by one fails it."""
    torch.manual_seed(9)
    w = quantize_rtn(torch.randn(32, 128), 32, ZeroKind.INT)
    lin = Int4Linear(w, torch.float32, "cpu", backend="cpu_native")
    w.zeros = (w.zeros + 1).clamp(max=15)
    x = torch.randn(4, 128)
    assert rel_err(lin(x), reference_linear(x, w)) > 1e-2


def _op_layer(w, dtype):
    kern = cpu_native.CpuNativeKernel(Int4LinearSpec.of(w, dtype, "cpu"))
    prepared = kern.prepare(w)
    return kern, [prepared[n] for n in kern.tensor_names]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind,group,act_order", [(ZeroKind.INT, 64, False),
                                                  (ZeroKind.FLOAT, 32, True),
                                                  (ZeroKind.NONE, -1, False),
                                                  (ZeroKind.INT, 128, True)])
def test_torch_op_equals_the_python_path(dtype, kind, group, act_order):
    """The C++ op ``int4xpu::cpu_native_mm`` (what vLLM layers call) is the computation of
    ``CpuNativeKernel.apply`` (the ``int4xpu::linear`` path), bit for bit, and matches float64:
    every M path (from DP_DENSE_MIN_M_SMALL rows, this small layer, bf16 dequantizes for torch's GEMM where AMX does not
    take it), act-order, bias, 3-D x."""
    torch.manual_seed(abs(group) + len(kind.value))
    K, N = 256, 83
    w = quantize_rtn(torch.randn(N, K) * 0.05, group, kind, scale_dtype=torch.bfloat16)
    if act_order:
        w.g_idx = (torch.randperm(K) // group).to(torch.int32)
    kern, tensors = _op_layer(w, dtype)
    args = kern.op_args()
    assert args is not None, cpu_native.load_op()
    bias = torch.randn(N, dtype=dtype)
    for M in (1, 2, 9, 17, cpu_native.DP_DENSE_MIN_M_SMALL + 3):
        x = torch.randn(M, K, dtype=dtype)
        y = int4_linear(x, tensors, "cpu_native", kern.spec, bias, args)
        assert y.dtype == dtype and torch.equal(y, kern.apply(tensors, x, bias)), M
        assert rel_err(y, reference_linear(x.double(), w, bias.double())) < TOL[dtype], M
    x3 = torch.randn(2, 5, K, dtype=dtype)
    y3 = int4_linear(x3, tensors, "cpu_native", kern.spec, None, args)
    assert y3.shape == (2, 5, N)
    assert torch.equal(y3.reshape(-1, N), kern.apply(tensors, x3.reshape(-1, K)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_op_dense_path(monkeypatch, dtype):
    """The op's dense branch (w dequantized into its reused buffer, torch's GEMM; fp16 in
    fp32) forced from 2 rows, against the Python path's and float64; a larger layer after a
    smaller one regrows the buffer."""
    for name in ("DP_DENSE_MIN_M", "DP_DENSE_MIN_M_SMALL", "FMA_DENSE_MIN_M", "DENSE_MIN_M"):
        monkeypatch.setattr(cpu_native, name, 2)
    monkeypatch.setattr(cpu_native, "amx_enabled", lambda: False)
    torch.manual_seed(11)
    for K, N in ((128, 40), (320, 72)):
        w = quantize_rtn(torch.randn(N, K) * 0.05, 64, ZeroKind.FLOAT, scale_dtype=torch.bfloat16)
        kern, tensors = _op_layer(w, dtype)
        args = kern.op_args()
        assert args[2] == 2  # dense_from
        for M in (1, 2, 33):
            x = torch.randn(M, K, dtype=dtype)
            y = int4_linear(x, tensors, "cpu_native", kern.spec, None, args)
            assert torch.equal(y, kern.apply(tensors, x)), (K, M)
            assert rel_err(y, reference_linear(x.double(), w)) < TOL[dtype], (K, M)


def test_torch_op_traces_under_torch_compile():
    """The op has a fake implementation: torch.compile(fullgraph) traces through it (opaque),
    and the compiled function gives the eager result."""
    torch.manual_seed(12)
    w = quantize_rtn(torch.randn(48, 128), 32, ZeroKind.INT)
    kern, tensors = _op_layer(w, torch.bfloat16)
    args = kern.op_args()
    x = torch.randn(3, 128, dtype=torch.bfloat16)

    def f(x):
        return torch.relu(int4_linear(x, tensors, "cpu_native", kern.spec, None, args)) * 2

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def test_torch_op_refusals_and_checks(monkeypatch, tmp_path):
    """Where the op cannot be built or is disabled, layers keep the Python op (op_args None,
    the reason logged); a failed build leaves no library behind; the op checks its tensors."""
    monkeypatch.setenv("VLLM_INT4XPU_CACHE", str(tmp_path))
    # without torch's include paths the op's source cannot compile
    path, why = cpu_native._build(cpu_native.OP_SOURCE, ["-shared", "-fPIC", "-std=c++17"])
    assert path is None and "building csrc/int4_cpu_op.cpp failed" in why
    assert not list(tmp_path.glob("*.so"))
    w = quantize_rtn(torch.randn(32, 128), 32, ZeroKind.INT)
    kern, tensors = _op_layer(w, torch.float32)
    args = kern.op_args()
    with pytest.raises(RuntimeError, match="qb holds"):
        torch.ops.int4xpu.cpu_native_mm(torch.randn(2, 64), *tensors, None, *args)
    with pytest.raises(RuntimeError, match="not float32/bfloat16/float16"):
        torch.ops.int4xpu.cpu_native_mm(torch.randn(2, 128, dtype=torch.float64), *tensors,
                                        None, *args)
    cpu_native.load_op.cache_clear()
    try:
        monkeypatch.setenv("VLLM_INT4XPU_CPU_NATIVE_OP", "0")
        assert kern.op_args() is None
        assert "VLLM_INT4XPU_CPU_NATIVE_OP=0" in cpu_native.load_op()
    finally:
        monkeypatch.delenv("VLLM_INT4XPU_CPU_NATIVE_OP")
        cpu_native.load_op.cache_clear()
    assert cpu_native.load_op() is None  # the op registered earlier in this process still serves


def _clear_library_caches():
    for f in (cpu_native.library_path, cpu_native.load_library, cpu_native.dp_built,
              cpu_native.fma_built, cpu_native.amx_enabled):
        f.cache_clear()


def _fresh_library(monkeypatch, tmp_path, **env):
    _clear_library_caches()
    monkeypatch.setenv("VLLM_INT4XPU_CACHE", str(tmp_path / "cache"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def restore_library():
    yield
    _clear_library_caches()


@pytest.mark.parametrize("march,features", [("x86-64-v3", 0), ("x86-64-v4", 1)])
def test_builds_without_avx512_or_bf16_match_float64(monkeypatch, tmp_path, restore_library,
                                                     march, features):
    """The same source built for older CPUs: scalar loops (no AVX-512) and the AVX-512 FMA path
    for every dtype (no AVX512-BF16), through the same packed layout and the dense path."""
    _fresh_library(monkeypatch, tmp_path, VLLM_INT4XPU_CPU_NATIVE_MARCH=march)
    lib, why = cpu_native.load_library()
    assert lib is not None, why
    assert lib.int4_cpu_features() == features
    for kind, group, dtype in ((ZeroKind.INT, 64, torch.bfloat16), (ZeroKind.FLOAT, 16,
                                torch.float32), (ZeroKind.NONE, -1, torch.float16)):
        torch.manual_seed(len(kind.value) + abs(group))
        w = quantize_rtn(torch.randn(37, 192) * 0.05, group, kind, scale_dtype=torch.bfloat16)
        for M in (1, 5, 17, cpu_native.DENSE_MIN_M):
            x = torch.randn(M, 192, dtype=dtype)
            err = rel_err(run(w, x, dtype), reference_linear(x.double(), w))
            assert err < TOL[dtype], (march, kind, group, dtype, M, err)


def test_falls_back_to_torch_op_when_the_build_fails(monkeypatch, tmp_path, caplog,
                                                     restore_library):
    bad = tmp_path / "bad-cxx"
    bad.write_text("#!/bin/sh\necho 'error: no compiler here' >&2\nexit 1\n")
    bad.chmod(0o755)
    _fresh_library(monkeypatch, tmp_path, CXX=str(bad))
    w = quantize_rtn(torch.randn(64, 128), 64, ZeroKind.INT)
    spec = Int4LinearSpec.of(w, torch.bfloat16, "cpu")
    with caplog.at_level(logging.INFO, logger="vllm.int4xpu"):
        assert select_kernel(spec).name == "cpu"
    text = " ".join(r.message for r in caplog.records)
    assert "cpu_native" in text and "building csrc/int4_cpu.cpp failed" in text
    assert "no compiler here" in text
    assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left


def test_disabled_by_env_and_built_into_the_cache(monkeypatch, tmp_path, restore_library):
    _fresh_library(monkeypatch, tmp_path, VLLM_INT4XPU_CPU_NATIVE="0")
    spec = Int4LinearSpec(128, 64, 64, ZeroKind.INT, False, torch.bfloat16, "cpu")
    ok, why = cpu_native.CpuNativeKernel.can_implement(spec)
    assert not ok and "VLLM_INT4XPU_CPU_NATIVE=0" in why
    _fresh_library(monkeypatch, tmp_path, VLLM_INT4XPU_CPU_NATIVE="1")
    assert cpu_native.CpuNativeKernel.can_implement(spec) == (True, None)
    assert len(list((tmp_path / "cache").glob("int4_cpu_*.so"))) == 1


def test_refuses_k_not_multiple_of_16():
    spec = Int4LinearSpec(120, 64, 120, ZeroKind.INT, False, torch.bfloat16, "cpu")
    ok, why = cpu_native.CpuNativeKernel.can_implement(spec)
    assert not ok and "multiples of 16" in why
