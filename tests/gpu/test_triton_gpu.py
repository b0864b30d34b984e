"""GPU check of the Triton int4 backend (CUDA; skipped elsewhere). Also runs as a script.

    python -m pytest -q tests/gpu/test_triton_gpu.py      # or: python tests/gpu/test_triton_gpu.py

Every algorithm (gemv / gemm with and without split-K / dequant), zero-point kind, group size,
act-order, ragged shapes, bf16/fp16/fp32, bias, the dispatcher, and CUDA-graph capture, against
the float64 oracle.
"""

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from vllm_int4xpu.kernels.base import Int4LinearSpec  # noqa: E402
from vllm_int4xpu.kernels.triton_backend import TritonKernel, int4_matmul  # noqa: E402
from vllm_int4xpu.weight import ZeroKind, quantize_rtn, reference_linear  # noqa: E402

TOL = {torch.bfloat16: 1.2e-2, torch.float16: 3e-3, torch.float32: 1e-4}
ALGOS = {
    "gemv": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1),
    "gemv_sk": dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=3),
    "gemv_even_n_empty_splits": dict(BLOCK_N=8, BLOCK_K=128, SPLIT_K=16),
    "gemv_bk32": dict(BLOCK_N=128, BLOCK_K=32, SPLIT_K=4),
    "gemv_rows2": dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, ROWS=2, num_warps=2),
    "gemv_pipelined": dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=3, STAGES=4),
    "gemv_rows4_pipelined": dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, ROWS=4, STAGES=3,
                                 num_warps=2),
    "gemv_rows4": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=3, ROWS=4, num_warps=2),
    "gemm": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1),
    "gemm_sk": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, num_warps=8),
    "gemm_sk_kernel2": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=3, SERIAL=False),
    "gemm_gather": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, GATHER=1),
    "gemm_frag": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, FRAG=1),
    "gemm_frag_bn128": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, FRAG=1),
    "gemm_frag_8warps": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, FRAG=1,
                             num_warps=8),
    "gemm_frag_packed": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, FRAG=2),
    "gemm_frag_packed_bn128": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, SPLIT_K=3, FRAG=2),
    "gemm_frag_packed_8warps": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, FRAG=2,
                                    num_warps=8),
    "gemm_persist": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, FRAG=2, PERSIST=6),
    "gemm_unroll2_persist": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, FRAG=2,
                                 PERSIST=4, UNROLL=2, num_warps=8, num_stages=4),
    "gemm_persist_bm64": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, FRAG=2,
                              PERSIST=3),
    "gemv_pdl": dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, PDL=1, num_warps=2),
    "gemv_pipelined_pdl": dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=3, STAGES=3, PDL=1),
    "gemm_pdl": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, FRAG=2, K_FASTEST=1,
                     PDL=1),
    "gemm_persist_pdl": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, FRAG=2,
                             PERSIST=3, PDL=1),
    "gemm_big": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8),
    "dequant": dict(BLOCK_N=64, BLOCK_K=128),
    "dequant_chunked": dict(BLOCK_N=64, BLOCK_K=128, CHUNK_N=64),
}


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def make(N, K, g, zk, dtype, act_order=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = quantize_rtn(torch.randn(N, K, generator=gen), g, zk, scale_dtype=dtype
                     if dtype != torch.float32 else torch.bfloat16)
    if act_order:
        G = K // g
        w.g_idx = torch.randperm(K, generator=gen).to(torch.int32) % G
    return w


CASES = list(itertools.product(list(ALGOS),
                               [ZeroKind.INT, ZeroKind.FLOAT, ZeroKind.NONE],
                               [32, 128, -1]))


@pytest.mark.parametrize("algo,zk,g", CASES)
def test_algorithms(algo, zk, g):
    for dtype, (M, N, K) in [(torch.bfloat16, (5, 200, 1024)), (torch.float16, (33, 136, 768)),
                             (torch.float32, (3, 72, 512))]:
        w = make(N, K, g if g > 0 else K, zk, dtype).to("cuda")
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        bias = torch.randn(N, device="cuda", dtype=dtype)
        name = algo.split("_")[0]
        y = int4_matmul(x, w.qweight, w.scales, w.zeros, zk, w.group_size, bias, algo=name,
                        **ALGOS[algo])
        err = rel(y, reference_linear(x, w, bias))
        assert err < TOL[dtype], (algo, zk, g, dtype, err)


@pytest.mark.parametrize("algo", ["gemv", "gemm", "dequant"])
def test_group_not_a_power_of_two(algo):
    w = make(264, 1152, 96, ZeroKind.FLOAT, torch.bfloat16).to("cuda")
    x = torch.randn(4, 1152, device="cuda", dtype=torch.bfloat16)
    y = int4_matmul(x, w.qweight, w.scales, w.zeros, ZeroKind.FLOAT, 96, None, algo=algo)
    assert rel(y, reference_linear(x, w)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("M", [1, 2, 7, 16, 64, 300, 1500])
def test_dispatch_backend_act_order_graph(M):
    K, N, g = 1024, 520, 128
    for zk in (ZeroKind.INT, ZeroKind.FLOAT):
        w = make(N, K, g, zk, torch.bfloat16, act_order=True, seed=M).to("cuda")
        spec = Int4LinearSpec.of(w, torch.bfloat16, "cuda")
        assert TritonKernel.can_implement(spec)[0]
        kern = TritonKernel(spec)
        t = kern.prepare(w)
        tensors = [t[n] for n in kern.tensor_names]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = reference_linear(x, w)
        assert rel(kern.apply(tensors, x), ref) < TOL[torch.bfloat16]
        # CUDA graph: capture, change the input in place, replay
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            kern.apply(tensors, x)
        torch.cuda.current_stream().wait_stream(s)
        g_ = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_):
            y = kern.apply(tensors, x)
        x.copy_(torch.randn_like(x))
        g_.replay()
        torch.cuda.synchronize()
        assert rel(y, reference_linear(x, w)) < TOL[torch.bfloat16], (M, zk)


PDL_CHAIN = {"gemv": dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=2),
             "gemm": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, FRAG=2, K_FASTEST=1)}


@pytest.mark.parametrize("algo,M", [("gemv", 1), ("gemm", 16)])
def test_pdl_chain_in_graph(algo, M):
    """A chain of PDL launches in one CUDA graph, each reading the previous one's output (the
    case PDL's wait protects): equal, bit for bit, to the same chain launched without PDL, and
    its first step to the float64 oracle. With PDL's wait left out, a program reads x while the
    previous kernel still writes it."""
    K = 2048
    ws = [make(K, K, 128, ZeroKind.FLOAT, torch.bfloat16, seed=i).to("cuda") for i in range(6)]
    x0 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

    def chain(pdl):
        h = x0
        for w in ws:
            h = int4_matmul(h, w.qweight, w.scales, w.zeros, ZeroKind.FLOAT, 128, algo=algo,
                            PDL=pdl, **PDL_CHAIN[algo])
            h = h / h.float().pow(2).mean(-1, keepdim=True).sqrt().to(h.dtype)  # keep scale
            h = int4_matmul(h, w.qweight, w.scales, w.zeros, ZeroKind.FLOAT, 128, algo=algo,
                            PDL=pdl, **PDL_CHAIN[algo])  # kernel after kernel, no op between
        return h

    expect = chain(False)
    first = int4_matmul(x0, ws[0].qweight, ws[0].scales, ws[0].zeros, ZeroKind.FLOAT, 128,
                        algo=algo, PDL=True, **PDL_CHAIN[algo])
    assert rel(first, reference_linear(x0, ws[0])) < TOL[torch.bfloat16]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = chain(True)
    for _ in range(20):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, expect)


if __name__ == "__main__":
    sys.exit(pytest.main(["-q", __file__]))
