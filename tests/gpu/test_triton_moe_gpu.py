"""GPU check of the fused Triton int4 MoE (CUDA; skipped elsewhere). Also runs as a script.

    python -m pytest -q -m gpu tests/gpu/test_triton_moe_gpu.py

Both paths, every zero-point kind, group sizes, act-order, top-k 1/2/8, idle experts, ragged
shapes, bf16/fp16, the dispatcher, no host sync inside ``apply`` (torch's sync debug mode) and
CUDA-graph capture / replay, against the float64 oracle.
"""

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from vllm_int4xpu.kernels.moe_base import Int4MoESpec  # noqa: E402
from vllm_int4xpu.kernels.moe_triton import TritonMoEKernel, choose_moe_config  # noqa: E402
from vllm_int4xpu.weight import Int4Experts, ZeroKind, quantize_rtn, reference_moe  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
CONFIGS = {
    "gemv": dict(path="gemv", BLOCK_N_13=32, BLOCK_K_13=128, warps_13=4, BLOCK_N_2=32,
                 BLOCK_K_2=128, SPLIT_K=3, warps_2=4),
    "gemv_sorted": dict(path="gemv", SORTED=True, BLOCK_N_13=16, BLOCK_K_13=256, warps_13=2,
                        BLOCK_N_2=64, BLOCK_K_2=64, SPLIT_K=1, warps_2=4),
    "gemv_serial": dict(path="gemv", SERIAL=True, BLOCK_N_13=16, BLOCK_K_13=512, warps_13=2,
                        BLOCK_N_2=64, BLOCK_K_2=128, SPLIT_K=4, warps_2=2, GROUP_M=1024,
                        PDL=True),
    "gemv_pdl_prefetch": dict(path="gemv", SERIAL=True, BLOCK_N_13=16, BLOCK_K_13=256,
                              warps_13=4, BLOCK_N_2=64, BLOCK_K_2=64, SPLIT_K=2, warps_2=2,
                              PDL=True, PDL_EARLY=True, PREFETCH=True),
    "dot16": dict(path="dot", BLOCK_M=16, BLOCK_N_13=64, BLOCK_K_13=128, warps_13=4,
                  BLOCK_N_2=64, BLOCK_K_2=128, SPLIT_K=2, warps_2=4, FRAG=2, GROUP_M=8,
                  PDL=True),
    "dot32_frag1": dict(path="dot", BLOCK_M=32, BLOCK_N_13=64, BLOCK_K_13=64, warps_13=4,
                        BLOCK_N_2=128, BLOCK_K_2=128, SPLIT_K=1, warps_2=8, FRAG=1),
    "dot64_frag0": dict(path="dot", BLOCK_M=64, BLOCK_N_13=128, BLOCK_K_13=64, warps_13=8,
                        BLOCK_N_2=64, BLOCK_K_2=64, SPLIT_K=1, warps_2=4, FRAG=0, stages=3),
    "dot128": dict(path="dot", BLOCK_M=128, BLOCK_N_13=64, BLOCK_K_13=128, warps_13=4,
                   BLOCK_N_2=128, BLOCK_K_2=64, SPLIT_K=1, warps_2=4, FRAG=2, stages=3,
                   GROUP_M=3),
    "dot128_xperm": dict(path="dot", BLOCK_M=128, BLOCK_N_13=64, BLOCK_K_13=128, warps_13=4,
                         BLOCK_N_2=128, BLOCK_K_2=64, SPLIT_K=1, warps_2=4, FRAG=2, stages=3,
                         XPERM_13=True, XPERM_2=True),
    "dot16_xperm2": dict(path="dot", BLOCK_M=16, BLOCK_N_13=64, BLOCK_K_13=128, warps_13=4,
                         BLOCK_N_2=64, BLOCK_K_2=128, SPLIT_K=2, warps_2=4, FRAG=2,
                         XPERM_2=True),
    "auto": None,
}


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def make_experts(E, N, K, g, zk, dtype, act_order, seed):
    gen = torch.Generator().manual_seed(seed)
    ws = []
    for _ in range(E):
        w = quantize_rtn(torch.randn(N, K, generator=gen) * 0.05, g, zk, scale_dtype=dtype)
        if act_order:
            w.g_idx = (torch.randperm(K, generator=gen) % (K // w.group_size)).to(torch.int32)
        ws.append(w)
    return Int4Experts.stack(ws)


def layer(E, H, I, g, zk, dtype, act_order=False, seed=0, activation="silu"):
    w13 = make_experts(E, 2 * I, H, g, zk, dtype, act_order, seed)
    w2 = make_experts(E, H, I, g, zk, dtype, act_order, seed + 1)
    w13c, w2c = (Int4Experts(**{k: (v.cuda() if torch.is_tensor(v) else v)
                                for k, v in w.__dict__.items()}) for w in (w13, w2))
    spec = Int4MoESpec.of(w13c, w2c, dtype, "cuda", activation)
    assert TritonMoEKernel.can_implement(spec)[0]
    kern = TritonMoEKernel(spec)
    t = kern.prepare(w13c, w2c)
    return w13, w2, kern, [t[n] for n in kern.tensor_names]


def routing(M, E, k, seed, idle=()):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor([e for e in range(E) if e not in idle])
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(M)])
    return torch.rand(M, k, generator=gen), ids


# every config with every zero kind; the group size rotates (32, 128, per-channel)
CASES = [(c, z, [32, 128, -1][i % 3]) for i, (c, z) in enumerate(
    itertools.product(list(CONFIGS), [ZeroKind.NONE, ZeroKind.INT, ZeroKind.FLOAT]))]


@pytest.mark.parametrize("cfg,zk,g", CASES)
def test_paths(cfg, zk, g):
    for dtype, (E, H, I, M, k, act) in [(torch.bfloat16, (16, 640, 384, 7, 2, False)),
                                        (torch.float16, (8, 384, 640, 33, 8, g != -1)),
                                        (torch.float16, (32, 256, 128, 300, 1, False))]:
        w13, w2, kern, t = layer(E, H, I, g, zk, dtype, act, seed=g + M)
        tw, ids = routing(M, E, k, seed=M, idle=(1, 5) if k < E - 2 else ())
        x = torch.randn(M, H, dtype=dtype)
        ref = reference_moe(x, w13, w2, tw, ids)
        y = kern.apply(t, x.cuda(), tw.cuda(), ids.cuda(), config=CONFIGS[cfg])
        torch.cuda.synchronize()
        assert y.dtype == dtype and rel(y.cpu(), ref) < TOL[dtype], (cfg, zk, g, dtype)


@pytest.mark.parametrize("base", ["dot16", "dot128", "dot32_frag1"])
def test_pre_permuted_operands_bit_equal(base):
    """XPERM_13 / XPERM_2 (A's columns in fragment order before the launch, no per-tile permute
    in the kernel) compute the same products in the same order: bit-equal to the base row."""
    dtype = torch.bfloat16 if base == "dot32_frag1" else torch.float16
    w13, w2, kern, t = layer(8, 512, 384, 128, ZeroKind.INT, dtype, seed=3)
    tw, ids = routing(200, 8, 2, seed=4, idle=(6,))
    x = torch.randn(200, 512, dtype=dtype).cuda()
    tw, ids = tw.cuda(), ids.cuda()
    y = kern.apply(t, x, tw, ids, config=CONFIGS[base])
    for knobs in (dict(XPERM_2=True), dict(XPERM_13=True, XPERM_2=True)):
        assert torch.equal(kern.apply(t, x, tw, ids, config=dict(CONFIGS[base], **knobs)), y), \
            knobs


@pytest.mark.parametrize("M", [1, 4, 16, 64, 256, 1500])
def test_dispatch_gelu_no_sync_graph(M):
    E, H, I, k = 32, 512, 256, 4
    w13, w2, kern, t = layer(E, H, I, 128, ZeroKind.INT, torch.bfloat16, act_order=True, seed=M,
                             activation="gelu")
    tw, ids = routing(M, E, k, seed=M, idle=(3,))
    x = torch.randn(M, H, dtype=torch.bfloat16)
    xc, twc, idc = x.cuda(), tw.cuda(), ids.cuda()
    kern.apply(t, xc, twc, idc)  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = kern.apply(t, xc, twc, idc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rel(y.cpu(), reference_moe(x, w13, w2, tw, ids, activation="gelu")) < 1e-2, \
        choose_moe_config(M * k, E, H, I)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kern.apply(t, xc, twc, idc)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = kern.apply(t, xc, twc, idc)
    tw2, ids2 = routing(M, E, k, seed=M + 100)
    x2 = torch.randn(M, H, dtype=torch.bfloat16)
    xc.copy_(x2.cuda())
    twc.copy_(tw2.cuda())
    idc.copy_(ids2.cuda())
    g.replay()
    torch.cuda.synchronize()
    assert rel(yg.cpu(), reference_moe(x2, w13, w2, tw2, ids2, activation="gelu")) < 1e-2
    eager = kern.apply(t, xc, twc, idc)
    assert torch.equal(eager, yg)  # deterministic: replay == eager, bit for bit


if __name__ == "__main__":
    sys.exit(pytest.main(["-q", "-m", "gpu", __file__]))
