"""Triton int4 kernels under the Triton interpreter (CPU, no GPU): every algorithm and branch
against the float64 oracle ``reference_linear``.

TRITON_INTERPRET=1 must be set before a @triton.jit function is *defined*; if another test module
already imported the kernels in GPU mode, this file re-runs itself in a subprocess.
"""

import triton_interp  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
IN_SUBPROCESS = triton_interp.must_rerun()
interpreted = pytest.mark.skipif(IN_SUBPROCESS, reason="kernels imported in GPU mode here; "
                                 "test_rerun_in_subprocess runs this file in interpreter mode")

from vllm_int4xpu.kernels import triton_backend as tb  # noqa: E402
from vllm_int4xpu.kernels.base import Int4LinearSpec  # noqa: E402
from vllm_int4xpu.weight import (ZeroKind, pack_int4, quantize_rtn, reference_linear,  # noqa: E402
                                 unpack_int4)


@pytest.mark.skipif(not IN_SUBPROCESS, reason="kernels are interpreted in this process")
def test_rerun_in_subprocess():
    triton_interp.rerun_in_subprocess(__file__)


# Output rounding dominates: bf16 has 8 mantissa bits (2^-9 ~ 2e-3 relative per element, and the
# tensor-core path also rounds the dequantized weight to bf16), fp16 has 11.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
ALGOS = {
    "gemv": ("gemv", dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=1)),
    "gemv_splitk": ("gemv", dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=3)),
    "gemm": ("gemm", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1)),
    "gemm_splitk": ("gemm", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)),
    "gemv_splitk_kernel2": ("gemv", dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, SERIAL=False)),
    # N % BLOCK_N == 0 (unmasked loads) and more splits than K tiles (empty trailing splits)
    "gemv_even_n_empty_splits": ("gemv", dict(BLOCK_N=8, BLOCK_K=128, SPLIT_K=8)),
    # several rows of x per program (M = 5: the last program has rows past M)
    "gemv_rows2": ("gemv", dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, ROWS=2)),
    # split index fastest in the grid (the splits of an N tile run side by side)
    "gemv_k_fastest": ("gemv", dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=3, ROWS=2, K_FASTEST=1)),
    "gemm_k_fastest": ("gemm", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=4, K_FASTEST=1)),
    "gemv_pipelined": ("gemv", dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, STAGES=3)),
    "gemv_rows2_pipelined": ("gemv", dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, ROWS=2, STAGES=4)),
    "gemv_rows4_splitk": ("gemv", dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=3, ROWS=4)),
    "gemv_rows4_kernel2": ("gemv", dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, ROWS=4,
                                        SERIAL=False)),
    "gemm_splitk_kernel2": ("gemm", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=3,
                                         SERIAL=False)),
    # weight tile unpacked straight into the MMA fragment order (x permuted to match)
    "gemm_frag": ("gemm", dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, FRAG=1)),
    "gemm_frag_bk32": ("gemm", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, FRAG=1,
                                    num_warps=2)),
    # ... with the packed (16-bit pair) dequantization; fp32 activations fall back to FRAG 1
    "gemm_frag_packed": ("gemm", dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=3, FRAG=2)),
    "gemm_frag_packed_w1": ("gemm", dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1, FRAG=2,
                                         num_warps=1)),
    "gemm_gather": ("gemm", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, GATHER=1)),
    # a fixed grid of programs walking all (split, N, M) tiles
    "gemm_persist": ("gemm", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=3, PERSIST=1)),
    "gemm_unroll2": ("gemm", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, UNROLL=2)),
    "gemm_persist_frag": ("gemm", dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=2, FRAG=2,
                                       PERSIST=1)),
    "dequant": ("dequant", dict(BLOCK_N=16, BLOCK_K=64)),
    "dequant_chunked": ("dequant", dict(BLOCK_N=16, BLOCK_K=64, CHUNK_N=16)),
}
GROUPS = [32, 64, 128, 256, -1]  # -1: per-channel
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def make_weight(N, K, group, zero_kind, dtype, seed=0, act_order=False):
    gen = torch.Generator().manual_seed(seed)
    sdt = torch.bfloat16 if dtype == torch.float32 else dtype
    w = quantize_rtn(torch.randn(N, K, generator=gen), group, zero_kind, scale_dtype=sdt)
    if act_order:
        w.g_idx = (torch.randperm(K, generator=gen) % (K // w.group_size)).to(torch.int32)
    return w


def run(w, x, bias=None, algo=None, **cfg):
    return tb.int4_matmul(x, w.qweight, w.scales, w.zeros, w.zero_kind, w.group_size, bias,
                          algo=algo, **cfg)


# Every algorithm x zero kind; group size and dtype rotate so each appears with each algorithm.
CASES = [(a, z, GROUPS[i % len(GROUPS)], DTYPES[i % len(DTYPES)])
         for i, (a, z) in enumerate(itertools.product(ALGOS, list(ZeroKind)))]


@interpreted
@pytest.mark.parametrize("variant,zero_kind,group,dtype", CASES,
                         ids=[f"{a}-{z.value}-g{g}-{str(d)[6:]}" for a, z, g, d in CASES])
def test_algorithm_matches_oracle(variant, zero_kind, group, dtype):
    # ragged: M, N not multiples of any tile; per-channel K not a multiple of BLOCK_K
    M, N, K = 5, 40, (520 if group == -1 else 512)
    w = make_weight(N, K, group, zero_kind, dtype, seed=len(variant))
    x = torch.randn(M, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    algo, cfg = ALGOS[variant]
    y = run(w, x, bias, algo=algo, **cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel(y, reference_linear(x, w, bias)) < TOL[dtype]


@interpreted
@pytest.mark.parametrize("algo", ["gemv", "gemm", "dequant"])
def test_group_not_a_power_of_two(algo):
    """Group 96: the kernels index groups by integer division instead of a shift."""
    from vllm_int4xpu.kernels.triton_kernels.common import group_shift
    assert group_shift(96, 576) == -1 and group_shift(128, 4096) == 7 and group_shift(576, 576) == 30
    w = make_weight(24, 576, 96, ZeroKind.INT, torch.bfloat16, seed=3)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    cfg = {"gemv": dict(BLOCK_N=8, SPLIT_K=2), "gemm": dict(BLOCK_M=16, BLOCK_N=16),
           "dequant": dict(BLOCK_N=8)}[algo]
    assert rel(run(w, x, algo=algo, **cfg), reference_linear(x, w)) < TOL[torch.bfloat16]


@interpreted
def test_gemv_x_views():
    """x read as int32 pairs: a one-row view at an odd element offset and a strided view still
    give the right answer (copied first), and a plain slice is read in place."""
    w = make_weight(24, 128, 64, ZeroKind.INT, torch.bfloat16, seed=6)
    big = torch.randn(3, 2 * 128 + 1, dtype=torch.bfloat16)
    for x in (big[:1, 1:129], big[:, 1:129], big[:, 128:256]):
        y = run(w, x, algo="gemv", BLOCK_N=8, SPLIT_K=2, ROWS=2 if x.shape[0] > 1 else 1)
        assert rel(y, reference_linear(x, w)) < TOL[torch.bfloat16]


@interpreted
@pytest.mark.parametrize("group", [16, 48])
@pytest.mark.parametrize("rows", [1, 2])
def test_gemv_tiles_of_two_words(group, rows):
    """Groups of 16 / 48 clip the GEMV tile to BLOCK_K = 16 (two words per row)."""
    w = make_weight(24, 96 if group == 48 else 64, group, ZeroKind.FLOAT, torch.bfloat16, seed=5)
    x = torch.randn(3, w.in_features, dtype=torch.bfloat16)
    y = run(w, x, algo="gemv", BLOCK_N=8, SPLIT_K=2, ROWS=rows)
    assert rel(y, reference_linear(x, w)) < TOL[torch.bfloat16]


@interpreted
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("M", [1, 20])
def test_dispatch_each_group_size(group, M):
    """The dispatcher's own choice (table lookup + BLOCK_K clipping) for every group size."""
    K = 264 if group == -1 else 512
    w = make_weight(24, K, group, ZeroKind.INT, torch.bfloat16, seed=M)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    assert rel(run(w, x), reference_linear(x, w)) < TOL[torch.bfloat16]


@interpreted
@pytest.mark.parametrize("zero_kind", [ZeroKind.INT, ZeroKind.FLOAT, ZeroKind.NONE])
def test_backend_act_order_fp16(zero_kind):
    """TritonKernel.prepare (act-order permutation) + apply (gather x) + bias."""
    N, K, g = 24, 256, 32
    w = make_weight(N, K, g, zero_kind, torch.float16, seed=3, act_order=True)
    spec = Int4LinearSpec.of(w, torch.float16, "cuda")
    kern = tb.TritonKernel(spec)
    prepared = kern.prepare(w)
    assert list(prepared) == list(kern.tensor_names)
    assert prepared["perm"].numel() == K
    t = [prepared[n] for n in kern.tensor_names]
    for M in (1, 7):
        x = torch.randn(M, K, dtype=torch.float16)
        bias = torch.randn(N, dtype=torch.float16)
        assert rel(kern.apply(t, x, bias), reference_linear(x, w, bias)) < TOL[torch.float16]


@interpreted
def test_serial_splitk_leaves_counters_zeroed():
    """The last split resets its tile counter, so repeated launches (graph replays) stay right."""
    from vllm_int4xpu.kernels.triton_kernels.common import tile_counters
    w = make_weight(40, 512, 64, ZeroKind.INT, torch.bfloat16)
    for M in (1, 17):
        x = torch.randn(M, 512, dtype=torch.bfloat16)
        ref = reference_linear(x, w)
        for _ in range(2):
            assert rel(run(w, x, algo="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=4),
                       ref) < TOL[torch.bfloat16]
            assert rel(run(w, x, algo="gemv", BLOCK_N=16, BLOCK_K=64, SPLIT_K=4),
                       ref) < TOL[torch.bfloat16]
        assert int(tile_counters(x.device).abs().sum()) == 0


@interpreted
def test_pdl_option_is_dropped_where_unsupported():
    """PDL (a CUDA sm_90+ launch option, VLLM_INT4XPU_PDL=1) is off on CPU and in the
    interpreter: the launchers drop it and the result is unchanged (the GPU tests run it)."""
    from vllm_int4xpu.kernels.triton_kernels.common import pdl_supported, use_pdl
    assert not pdl_supported("cpu") and not use_pdl(True, "cpu")
    w = make_weight(40, 256, 64, ZeroKind.FLOAT, torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = reference_linear(x, w)
    for algo, cfg in (("gemv", dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)),
                      ("gemm", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2))):
        assert rel(run(w, x, algo=algo, PDL=1, **cfg), ref) < TOL[torch.bfloat16]


def test_pdl_switch_rejects_other_values(monkeypatch):
    """VLLM_INT4XPU_PDL takes 0 or 1: anything else is our error naming the variable and value,
    not a silently ignored setting."""
    from vllm_int4xpu.errors import Int4FormatError
    from vllm_int4xpu.kernels.triton_kernels import common
    for value in ("0", "1", ""):
        monkeypatch.setattr(common, "_PDL_ENV", value)
        assert common.use_pdl(True, "cpu") is False  # never on CPU, and no error
    monkeypatch.setattr(common, "_PDL_ENV", "yes")
    with pytest.raises(Int4FormatError, match="VLLM_INT4XPU_PDL.*expected=0, 1 or unset.*'yes'"):
        common.use_pdl(True, "cpu")


@interpreted
def test_large_m_path_picks_dequant():
    w = make_weight(16, 128, 64, ZeroKind.FLOAT, torch.bfloat16)
    assert tb.choose_config("cuda_h100", 4096, 128, 16, 64)[0] == "dequant"
    x = torch.randn(1100, 128, dtype=torch.bfloat16)
    assert rel(run(w, x), reference_linear(x, w)) < TOL[torch.bfloat16]


def test_dispatch_rule_and_block_k_clipping():
    for fam in ("cuda_h100", "xpu"):
        assert tb.choose_config(fam, 1, 4096, 4096, 128)[0] in ("gemv", "gemm")
        assert tb.choose_config(fam, 64, 4096, 4096, 128)[0] == "gemm"
        assert tb.choose_config(fam, 100000, 4096, 4096, 128)[0] == "dequant"
        for M in (1, 3, 16, 64, 256, 5000):
            algo, cfg = tb.choose_config(fam, M, 4096, 4096, 32)
            assert cfg["BLOCK_K"] <= 32  # never straddles a group
    assert tb.fit_block_k(256, 48, 480) == 16
    assert tb.fit_block_k(256, 520, 520) == 256  # per-channel: any tile, masked tail
    assert tb.fit_block_k(256, 40, 40) == 64  # tiny per-channel K: not over-padded
    assert tb.m_bucket(3, [1, 4, 16]) == 4 and tb.m_bucket(99, [1, 4, 16]) == 16


def test_explicit_algorithm_takes_exactly_the_given_config(monkeypatch):
    """With ``algo`` the launch gets only the given parameters: a tested or tuned config must
    not silently inherit options (FRAG, K_FASTEST, maxnreg, ...) from the table's row."""
    algo, row = tb.choose_config("cuda_h100", 5, 512, 40, 64)
    assert algo == "gemm" and row.get("FRAG") == 2  # the row a plain gemm test falls into
    seen = {}

    def record(x, qweight, scales, zeros, code, group, bias, out, **cfg):
        seen.update(cfg)
        return out

    monkeypatch.setitem(tb.tk.ALGORITHMS, "gemm", record)
    w = make_weight(40, 512, 64, ZeroKind.INT, torch.bfloat16)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    run(w, x, algo="gemm", BLOCK_M=16, BLOCK_N=32)
    assert seen == {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}
    seen.clear()
    run(w, x, family="cuda_h100", BLOCK_N=32)  # table row + override
    assert seen["FRAG"] == 2 and seen["BLOCK_N"] == 32


def _spec(**kw):
    base = dict(in_features=4096, out_features=4096, group_size=128, zero_kind=ZeroKind.INT,
                has_g_idx=False, act_dtype=torch.bfloat16, device_type="cuda")
    base.update(kw)
    return Int4LinearSpec(**base)


def test_can_implement_and_refusals():
    assert tb.TritonKernel.can_implement(_spec()) == (True, None)
    assert tb.TritonKernel.can_implement(_spec(device_type="xpu"))[0]
    assert tb.TritonKernel.can_implement(_spec(group_size=4096))[0]  # per-channel
    for bad, word in [(_spec(device_type="cpu"), "cpu"), (_spec(group_size=8), "group size"),
                      (_spec(group_size=24), "group size"),
                      (_spec(act_dtype=torch.int8), "dtype"),
                      (_spec(in_features=4100, group_size=4100), "multiple of 8")]:
        ok, why = tb.TritonKernel.can_implement(bad)
        assert not ok and word in why, (bad, why)


@interpreted
def test_checks_can_fail():
    """The oracle comparison catches a wrong nibble order and a wrong zero point."""
    w = make_weight(24, 256, 64, ZeroKind.INT, torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = reference_linear(x, w)
    codes = unpack_int4(w.qweight).view(24, -1, 8).flip(-1).reshape(24, 256)  # high nibble first
    swapped = type(w)(**{**w.__dict__, "qweight": pack_int4(codes)})
    for algo, cfg in ALGOS.values():
        assert rel(run(swapped, x, algo=algo, **cfg), ref) > 0.1
    wrong_zero = type(w)(**{**w.__dict__, "zeros": (w.zeros + 1).clamp(max=15)})
    assert rel(run(wrong_zero, x, algo="gemv"), ref) > 3 * TOL[torch.bfloat16]
    assert rel(run(w, x, algo="gemv"), ref) < TOL[torch.bfloat16]
