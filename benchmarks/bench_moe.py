"""Fused int4 MoE on CUDA: ours (backend ``triton``) vs vLLM's Triton int4 MoE kernel
(``fused_moe_kernel_gptq_awq``) and its dense fused MoE kernel (``fused_moe_kernel``), same
weights, both GEMMs of one layer (gate_up + act + down + reduce), token sort included.

    python benchmarks/bench_moe.py --anchor .anchor/vllm_fused_moe.py --out DIR

vLLM is not imported (nor installed on the GPU machine): the two @triton.jit kernels (and
``write_zeros_to_output``, which they call) are cut out of the text of vLLM's
``fused_moe/fused_moe.py`` at run time with ``ast`` into a module written to a temp folder; no
vLLM code is kept in this repository. Their launches follow vLLM's ``invoke_fused_moe_*`` and
``get_default_config`` (no tuned config file: none ships for the H200 and these shapes); their
token sort is :func:`fused_moe.sort_pairs` (vLLM's is a C++ op), the activation and the slot sum
are torch ops (``silu(gate) * up``, ``sum(dim=1)``).

Method: symmetric group-128 int4 weights (fp16 scales), fp16 activations, uniform random top-k
routing. Each timed graph holds C x R calls, over C copies of the weights and R routings (L2
defeat: every call reads weights L2 has not just seen), timed by CUDA events over graph replays,
the row's contenders round-robin (median of 20). Floor = max(bytes / copy bandwidth, FLOPs /
peak), bytes = distinct experts hit x bytes per expert (the kernel's own format) + activations;
both ceilings measured in this run.
Every kernel's output is checked against the float64 oracle before timing.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import time_graph, time_graphs_interleaved  # noqa: E402
from vllm_int4xpu.kernels.moe_base import Int4MoESpec  # noqa: E402
from vllm_int4xpu.kernels.moe_triton import TritonMoEKernel, choose_moe_config  # noqa: E402
from vllm_int4xpu.kernels.triton_kernels.fused_moe import sort_pairs  # noqa: E402
from vllm_int4xpu.weight import (Int4Experts, ZeroKind, dequantize, quantize_rtn,  # noqa: E402
                                 reference_moe)

SHAPES = {"Qwen3-30B-A3B": dict(E=128, k=8, H=2048, I=768),
          "Mixtral-8x7B": dict(E=8, k=2, H=4096, I=14336)}
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
ANCHOR_KERNELS = ("write_zeros_to_output", "fused_moe_kernel_gptq_awq", "fused_moe_kernel")


def load_anchor(path: str):
    """The vLLM Triton kernels, cut out of fused_moe.py's text into a fresh module."""
    tree = ast.parse(Path(path).read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ANCHOR_KERNELS]
    assert {f.name for f in funcs} == set(ANCHOR_KERNELS), [f.name for f in funcs]
    src = "import triton\nimport triton.language as tl\n\n\n" + "\n\n\n".join(
        ast.unparse(f) for f in funcs) + "\n"
    d = Path(tempfile.mkdtemp(prefix="vllm_anchor_"))
    (d / "vllm_moe_anchor.py").write_text(src)
    spec = importlib.util.spec_from_file_location("vllm_moe_anchor", d / "vllm_moe_anchor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ vLLM launches
def _wna16_config(M: int) -> dict:
    bm = 16 if M <= 20 else 32 if M <= 40 else 64
    bn, bk = (32, 64) if M == 1 else (64, 32)
    return dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=1, SPLIT_K=1)


def _dense_config(M: int, E: int) -> dict:
    bm = 16 if M <= 32 else 32 if M <= 96 else 64 if M <= 512 else 128
    return dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=64 if M <= 64 else 128,
                BLOCK_SIZE_K=128 if M <= 64 else 64,
                GROUP_SIZE_M=16 if M // max(E, 1) > 128 else 1, SPLIT_K=1,
                num_warps=4 if M <= 128 else 8, num_stages=4 if M <= 32 else 3)


def _em(sorted_ids, M_rows, top_k, bm):
    em = sorted_ids.numel()
    return min(em, M_rows * top_k * bm) if M_rows < bm else em


def vllm_int4_gemm(mod, A, B, C, B_scale, topw, sorting, mul_w, top_k, group, cfg):
    import triton
    import triton.language as tl
    sorted_ids, expert_ids, npad = sorting
    N, K = B.shape[1], A.shape[1]
    em = _em(sorted_ids, A.shape[0], top_k, cfg["BLOCK_SIZE_M"])
    grid = (triton.cdiv(em, cfg["BLOCK_SIZE_M"]) * triton.cdiv(N, cfg["BLOCK_SIZE_N"]),)
    mod.fused_moe_kernel_gptq_awq[grid](
        A, B, C, B_scale, None, topw, sorted_ids, expert_ids, npad, N, K, em,
        A.shape[0] * top_k, A.stride(0), A.stride(1), B.stride(0), B.stride(2), B.stride(1),
        C.stride(1), C.stride(2), B_scale.stride(0), B_scale.stride(2), B_scale.stride(1),
        0, 0, 0, block_k_diviable=K % cfg["BLOCK_SIZE_K"] == 0, group_size=group,
        MUL_ROUTED_WEIGHT=mul_w, top_k=top_k,
        compute_type=tl.float16 if A.dtype == torch.float16 else tl.bfloat16,
        has_zp=False, use_int4_w4a16=True, use_int8_w8a16=False, **cfg)


def vllm_dense_gemm(mod, A, B, C, topw, sorting, mul_w, top_k, cfg):
    import triton
    import triton.language as tl
    sorted_ids, expert_ids, npad = sorting
    N, K = B.shape[1], B.shape[2]
    em = _em(sorted_ids, A.shape[0], top_k, cfg["BLOCK_SIZE_M"])
    grid = (triton.cdiv(em, cfg["BLOCK_SIZE_M"]) * triton.cdiv(N, cfg["BLOCK_SIZE_N"]),)
    mod.fused_moe_kernel[grid](
        A, B, C, None, None, None, topw, sorted_ids, expert_ids, npad, N, K, em,
        A.shape[0] * top_k, A.stride(0), A.stride(1), B.stride(0), B.stride(2), B.stride(1),
        C.stride(1), C.stride(2), 0, 0, 0, 0, 0, 0, 0, 0, 0, naive_block_assignment=False,
        MUL_ROUTED_WEIGHT=mul_w, top_k=top_k,
        compute_type=tl.float16 if A.dtype == torch.float16 else tl.bfloat16,
        use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False,
        HAS_BIAS=False, SWAP_AB=False, USE_TD=False, **cfg)


def anchor_block_m(kind: str, M: int, E: int) -> int:
    return (_wna16_config(M) if kind == "int4" else _dense_config(M, E))["BLOCK_SIZE_M"]


def vllm_moe(mod, kind, w, x, topw, ids, E, group, sorting=None):
    """One layer the way vLLM's fused_experts runs it: sort, gate_up, silu*up, down (router
    weight), sum over slots. ``sorting`` given: the sort is not part of the call (presorted)."""
    M, k = ids.shape
    H = x.shape[1]
    cfg = _wna16_config(M) if kind == "int4" else _dense_config(M, E)
    nw = {} if kind == "int4" else dict(num_warps=cfg.pop("num_warps"),
                                        num_stages=cfg.pop("num_stages"))
    if sorting is None:
        sorting = sort_pairs(ids, E, cfg["BLOCK_SIZE_M"])
    topw = topw.reshape(-1)
    n13 = w["b13"].shape[1]
    c1 = torch.empty((M, k, n13), dtype=x.dtype, device=x.device)
    c3 = torch.empty((M, k, H), dtype=x.dtype, device=x.device)
    if kind == "int4":
        vllm_int4_gemm(mod, x, w["b13"], c1, w["s13"], topw, sorting, False, k, group, cfg)
    else:
        vllm_dense_gemm(mod, x, w["b13"], c1, topw, sorting, False, k, dict(cfg, **nw))
    c1 = c1.view(M * k, n13)
    gate, up = c1.chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    if kind == "int4":
        vllm_int4_gemm(mod, h, w["b2"], c3, w["s2"], topw, sorting, True, 1, group, cfg)
    else:
        vllm_dense_gemm(mod, h, w["b2"], c3, topw, sorting, True, 1, dict(cfg, **nw))
    return c3.sum(dim=1)


# ---------------------------------------------------------------------------------- harness
def measure_ceilings():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(10):
        b.copy_(a)
    ev[1].record()
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 10 / (ev[0].elapsed_time(ev[1]) * 1e-3)
    del a, b
    n = 8192
    x = torch.randn(n, n, dtype=torch.float16, device="cuda")
    y = torch.randn(n, n, dtype=torch.float16, device="cuda")
    for _ in range(3):
        x @ y
    ev[0].record()
    for _ in range(10):
        x @ y
    ev[1].record()
    torch.cuda.synchronize()
    peak = 2 * n ** 3 * 10 / (ev[0].elapsed_time(ev[1]) * 1e-3)
    return bw, peak


def make_layer(E, H, I, dtype, group, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def stack(N, K):
        return Int4Experts.stack([quantize_rtn(torch.randn(N, K, device="cuda", generator=gen)
                                               * 0.02, group, ZeroKind.NONE, scale_dtype=dtype)
                                  for _ in range(E)])
    return stack(2 * I, H), stack(H, I)


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def _row(bn13, bk13, w13, bn2, bk2, split, w2, **kw) -> dict:
    """A launch row from its gate_up tile (BLOCK_N, BLOCK_K, warps), its down tile and K split."""
    return dict(BLOCK_N_13=bn13, BLOCK_K_13=bk13, warps_13=w13, BLOCK_N_2=bn2, BLOCK_K_2=bk2,
                SPLIT_K=split, warps_2=w2, **kw)


# --sweep: launch rows tried for ours on each benchmark row (the dispatcher's own row first); the
# fastest is reported with its config, and MOE_CONFIGS holds the winners.
SWEEP = {
    # gemv: each launch shape with K tiles of one group (128), two and four groups
    "gemv": [dict(c, path="gemv", BLOCK_K_13=bk, BLOCK_K_2=bk) for bk in (128, 256, 512) for c in (
        dict(BLOCK_N_13=64, warps_13=2, BLOCK_N_2=64, SPLIT_K=4, warps_2=2),
        dict(BLOCK_N_13=32, warps_13=1, BLOCK_N_2=64, SPLIT_K=8, warps_2=2),
        dict(BLOCK_N_13=64, warps_13=1, BLOCK_N_2=128, SPLIT_K=4, warps_2=2),
        dict(BLOCK_N_13=32, warps_13=2, BLOCK_N_2=32, SPLIT_K=2, warps_2=1),
        dict(BLOCK_N_13=16, warps_13=1, BLOCK_N_2=32, SPLIT_K=8, warps_2=1),
        dict(BLOCK_N_13=32, warps_13=4, BLOCK_N_2=64, SPLIT_K=3, warps_2=4),
        dict(BLOCK_N_13=128, warps_13=4, BLOCK_N_2=128, SPLIT_K=8, warps_2=4),
        dict(BLOCK_N_13=16, warps_13=2, BLOCK_N_2=32, SPLIT_K=8, warps_2=1),
        dict(BLOCK_N_13=8, warps_13=1, BLOCK_N_2=16, SPLIT_K=8, warps_2=1),
        dict(BLOCK_N_13=16, warps_13=1, BLOCK_N_2=32, SPLIT_K=16, warps_2=1),
        dict(BLOCK_N_13=32, warps_13=2, BLOCK_N_2=64, SPLIT_K=3, warps_2=2),
        dict(BLOCK_N_13=16, warps_13=1, BLOCK_N_2=32, SPLIT_K=8, warps_2=1, SORTED=True),
        dict(BLOCK_N_13=64, warps_13=1, BLOCK_N_2=128, SPLIT_K=4, warps_2=2, SORTED=True))],
    # gemv with the down GEMM reducing in its own programs (SERIAL) and K tiles up to the whole
    # gate_up K; run with --sweep-set gemv_new
    "gemv_new": [_row(*r, path="gemv", SERIAL=True) for r in (
        (32, 512, 4, 64, 512, 3, 4), (16, 256, 1, 32, 256, 8, 1), (8, 2048, 2, 32, 256, 4, 1),
        (16, 1024, 4, 64, 256, 4, 2))],
    # every row: program order (8 rows, or all rows, walking the N tiles together), each with
    # and without PDL between gate_up and down
    "order_pdl": [dict(GROUP_M=g, **pdl) for pdl in ({}, dict(PDL=True)) for g in (8, 1024)],
    # decode rows on the tensor-core path (BLOCK_M 16, sorted blocks: each expert's weight read
    # once however many of its pairs there are), the down GEMM split along its K in 1..4;
    # run with --sweep-set decode_dot
    "decode_dot": [_row(*r, path="dot", FRAG=2, BLOCK_M=16, stages=st) for *r, st in (
        (64, 128, 4, 128, 64, 1, 4, 3), (64, 128, 4, 128, 64, 2, 4, 3),
        (64, 128, 4, 64, 128, 2, 4, 3), (64, 128, 4, 64, 128, 4, 4, 3),
        (32, 128, 4, 64, 128, 4, 4, 3), (32, 128, 2, 32, 128, 2, 2, 4),
        (128, 64, 4, 128, 128, 2, 4, 4), (64, 128, 4, 128, 64, 1, 4, 4))],
    # gemv walking the pairs in expert order (SORTED) with GROUP_M sorted pairs walking the N
    # tiles together, so the pairs of one expert read each weight tile from memory once and
    # share it through L2; run with --sweep-set sorted_group
    "sorted_group": [_row(*r, path="gemv", SORTED=True, SERIAL=False, GROUP_M=g)
                     for g in (1, 8, 64) for r in (
        (16, 256, 1, 32, 256, 8, 1), (64, 128, 1, 128, 128, 4, 2), (32, 256, 2, 64, 256, 4, 2))],
    # prefill rows with taller blocks (BLOCK_M 128 / 256: each dequantized weight tile serves
    # more rows) and wider N tiles with 8 warps; run with --sweep-set large_dot
    "large_dot": [_row(*r, path="dot", FRAG=2, BLOCK_M=bm, stages=st) for bm, *r, st in (
        (128, 64, 128, 4, 128, 64, 1, 4, 3), (128, 128, 64, 8, 128, 64, 1, 8, 3),
        (128, 128, 64, 8, 128, 64, 1, 8, 4), (128, 256, 64, 8, 256, 64, 1, 8, 3),
        (256, 128, 64, 8, 128, 64, 1, 8, 3), (256, 128, 64, 8, 128, 64, 1, 8, 2),
        (256, 64, 128, 4, 64, 128, 1, 4, 2), (256, 128, 32, 8, 128, 32, 1, 8, 4))],
    # dot rows with A's columns handed over in fragment order (XPERM_2: gate_up writes h in
    # the down GEMM's order; XPERM_13: x gathered into gate_up's order by one launch first), so
    # the kernels feed x to the MMA as loaded; run with --sweep-set xperm
    "xperm": [dict(XPERM_2=True), dict(XPERM_13=True, XPERM_2=True),
              dict(XPERM_13=True, XPERM_2=True, stages=4),
              dict(XPERM_13=True, XPERM_2=True, stages=2)],
    # 256 / 1024 tokens: block heights with both operands pre-permuted; --sweep-set xperm_m
    "xperm_m": [dict(BLOCK_M=32, XPERM_13=True), dict(BLOCK_M=64, XPERM_13=True),
                dict(BLOCK_M=128, XPERM_13=True), dict(BLOCK_M=64), dict(XPERM_2=False)],
    # gemv rows with PDL between gate_up and down: the down GEMM's first weight tile fetched
    # before its wait for gate_up (PREFETCH), gate_up letting down launch at its start
    # (PDL_EARLY) rather than after its K loop; the last entry repeats the dispatcher's row (the
    # spread of the sequential timings); run with --sweep-set pdl_prefetch
    "pdl_prefetch": [dict(PDL=True), dict(PDL=True, PREFETCH=True),
                     dict(PDL=True, PDL_EARLY=True), dict(PDL=True, PDL_EARLY=True, PREFETCH=True),
                     dict()],
    # gemv rows: the down GEMM split into no more parts than it has K tiles (Qwen3-30B-A3B's
    # down K = 768 is 3 tiles of 256: SPLIT_K 4 / 8 launch 1 / 5 empty programs per tile and
    # pair, whose zero partials the last arrival still sums), other tile shapes; the last entry
    # repeats the dispatcher's row; run with --sweep-set down_split
    "down_split": [dict(SPLIT_K=3), dict(BLOCK_K_2=128, SPLIT_K=6),
                   dict(BLOCK_K_2=128, SPLIT_K=3), dict(BLOCK_N_2=32, SPLIT_K=3),
                   dict(BLOCK_N_2=128, SPLIT_K=3), dict()],
    "dot": [dict(BLOCK_N_13=128, BLOCK_K_13=128, warps_13=8, BLOCK_N_2=128, BLOCK_K_2=128,
                 warps_2=8),
            dict(BLOCK_N_13=64, BLOCK_K_13=128, warps_13=4, BLOCK_N_2=128, BLOCK_K_2=64,
                 SPLIT_K=1, warps_2=4, stages=3),
            dict(BLOCK_N_13=128, BLOCK_K_13=64, warps_13=4, BLOCK_N_2=64, BLOCK_K_2=128,
                 SPLIT_K=2, warps_2=4, stages=4),
            dict(BLOCK_M=128, BLOCK_N_13=128, BLOCK_K_13=64, warps_13=8, BLOCK_N_2=128,
                 BLOCK_K_2=64, SPLIT_K=1, warps_2=8, stages=3),
            dict(BLOCK_M=128, BLOCK_N_13=64, BLOCK_K_13=128, warps_13=4, BLOCK_N_2=128,
                 BLOCK_K_2=64, SPLIT_K=1, warps_2=4, stages=3),
            dict(BLOCK_M=64, BLOCK_N_13=128, BLOCK_K_13=128, warps_13=8, BLOCK_N_2=128,
                 BLOCK_K_2=128, SPLIT_K=1, warps_2=8, stages=3),
            dict(BLOCK_M=32, BLOCK_N_13=128, BLOCK_K_13=128, warps_13=4, BLOCK_N_2=128,
                 BLOCK_K_2=128, SPLIT_K=1, warps_2=4, stages=3),
            dict(BLOCK_M=128, BLOCK_N_13=128, BLOCK_K_13=128, warps_13=8, BLOCK_N_2=128,
                 BLOCK_K_2=128, SPLIT_K=1, warps_2=8, stages=3),
            dict(BLOCK_M=64, BLOCK_N_13=64, BLOCK_K_13=128, warps_13=4, BLOCK_N_2=128,
                 BLOCK_K_2=64, SPLIT_K=1, warps_2=4, stages=4)],
}


def candidates(cfg, sweep_set=None):
    return [dict(cfg)] + [dict(cfg, **c) for c in SWEEP[sweep_set or cfg["path"]]]


def run_shape(name, shp, tokens, anchor, bw, peak, dtype, copies, routings, group=128,
              sweep=False, sweep_set=None):
    E, k, H, I = shp["E"], shp["k"], shp["H"], shp["I"]
    layers = [make_layer(E, H, I, dtype, group, seed=c) for c in range(copies)]
    spec = Int4MoESpec.of(*layers[0], dtype, "cuda")
    kern = TritonMoEKernel(spec)
    ours_t, v4_w, vd_w = [], [], []
    for w13, w2 in layers:
        t = kern.prepare(w13, w2)
        ours_t.append([t[n] for n in kern.tensor_names])
        # vLLM's wna16 layout: B uint8 [E, N, K/2] (low nibble = even k: the canonical qweight's
        # bytes), scales [E, N, K/g] (a transposed view; strides are passed)
        v4_w.append(dict(b13=w13.qweight.view(torch.uint8), s13=w13.scales.transpose(1, 2),
                         b2=w2.qweight.view(torch.uint8), s2=w2.scales.transpose(1, 2)))
        if anchor is not None:
            vd_w.append(dict(
                b13=torch.stack([dequantize(w13.expert(e), dtype) for e in range(E)]),
                b2=torch.stack([dequantize(w2.expert(e), dtype) for e in range(E)])))
    int4_expert_bytes = (2 * I * H // 2 + H * I // 2) + (2 * I * H // group + H * I // group) * 2
    dense_expert_bytes = 3 * I * H * 2
    rows = []
    for M in tokens:
        gen = torch.Generator(device="cuda").manual_seed(M)
        xs, routs = [], []
        for r in range(routings):
            xs.append(torch.randn(M, H, device="cuda", dtype=dtype, generator=gen))
            ids = torch.rand(M, E, device="cuda", generator=gen).argsort(dim=1)[:, :k]
            tw = torch.rand(M, k, device="cuda", generator=gen)
            routs.append((tw / tw.sum(1, keepdim=True), ids.to(torch.int32)))
        hit = statistics.mean(int(torch.unique(ids).numel()) for _, ids in routs)
        act_bytes = 2 * M * H * 2
        flops = 6 * M * k * H * I
        floor4 = max((hit * int4_expert_bytes + act_bytes) / bw, flops / peak) * 1e6
        floord = max((hit * dense_expert_bytes + act_bytes) / bw, flops / peak) * 1e6
        w13, w2 = layers[0]
        ref = reference_moe(xs[0], w13, w2, routs[0][0], routs[0][1])
        cfg = choose_moe_config(M * k, E, H, I)
        row = dict(shape=name, tokens=M, E=E, top_k=k, H=H, I=I, experts_hit=hit,
                   path=cfg["path"], floor_int4_us=floor4, floor_dense_us=floord)

        def calls(fn):
            return [(lambda c=c, r=r: fn(c, r)) for c in range(copies) for r in range(routings)]

        best = None
        for cand in (candidates(cfg, sweep_set) if sweep else [None]):
            def ours(c, r, cand=cand):
                return kern.apply(ours_t[c], xs[r], *routs[r], config=cand)
            try:
                err = rel(ours(0, 0), ref)
                us = time_graph(calls(ours)) if sweep else float("nan")
            except Exception as e:  # a candidate Triton cannot compile: report, go on
                if not sweep:
                    raise
                print(f"  sweep {name} M={M}: failed {type(e).__name__}: {str(e)[:200]} {cand}")
                continue
            if sweep:
                print(f"  sweep {name} M={M}: {us:8.1f} us  err {err:.1e}  {cand}", flush=True)
            if best is None or us < best[0]:
                best = (us, err, cand)
        row["err_ours"], row["config_ours"] = best[1], best[2]

        def ours_best(c, r):
            return kern.apply(ours_t[c], xs[r], *routs[r], config=best[2])
        # the row's contenders timed round-robin (time_graphs_interleaved): ours with the chosen
        # launch row, and the anchors as run and presorted
        contenders = {"ours": calls(ours_best)}
        if anchor is not None:
            def v4(c, r):
                return vllm_moe(anchor, "int4", v4_w[c], xs[r], *routs[r], E, group)

            def vd(c, r):
                return vllm_moe(anchor, "dense", vd_w[c], xs[r], *routs[r], E, group)
            row["err_vllm_int4"] = rel(v4(0, 0), ref)
            row["err_vllm_dense"] = rel(vd(0, 0), ref)
            # the same with the token sort done before the graph (vLLM sorts with one C++ op;
            # the torch sort here is ~15 small kernels): the anchors' GEMM + activation + sum only
            pre = {kind: [sort_pairs(routs[r][1], E, anchor_block_m(kind, M, E))
                          for r in range(routings)] for kind in ("int4", "dense")}

            def v4p(c, r):
                return vllm_moe(anchor, "int4", v4_w[c], xs[r], *routs[r], E, group, pre["int4"][r])

            def vdp(c, r):
                return vllm_moe(anchor, "dense", vd_w[c], xs[r], *routs[r], E, group, pre["dense"][r])
            contenders.update(vllm_int4=calls(v4), vllm_dense=calls(vd),
                              vllm_int4_presorted=calls(v4p), vllm_dense_presorted=calls(vdp))
        for who, us in time_graphs_interleaved(contenders).items():
            row[f"us_{who}"] = us
        row["pct_floor_ours"] = 100 * floor4 / row["us_ours"]
        if anchor is not None:
            row["pct_floor_vllm_int4"] = 100 * floor4 / row["us_vllm_int4"]
            row["pct_floor_vllm_dense"] = 100 * floord / row["us_vllm_dense"]
            row["speedup_vs_vllm_int4"] = row["us_vllm_int4"] / row["us_ours"]
            row["speedup_vs_vllm_dense"] = row["us_vllm_dense"] / row["us_ours"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    layers = ours_t = v4_w = vd_w = None
    torch.cuda.empty_cache()
    return rows


def table(rows, dtype_name) -> str:
    """µs per layer; the anchors twice: as run (torch sort inside) and presorted (sort outside
    the graph, i.e. their GEMMs + activation + slot sum only). Speed-ups against presorted."""
    nan = float("nan")
    out = [f"| shape | tokens | experts hit | path | ours µs ({dtype_name}) | % floor | "
           "vLLM int4 µs (presorted) | vLLM dense µs (presorted) | % floor dense presorted | "
           "ours / int4 | ours / dense | rel. err ours / int4 / dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v4p, vdp = r.get("us_vllm_int4_presorted", nan), r.get("us_vllm_dense_presorted", nan)
        out.append(
            f"| {r['shape']} | {r['tokens']} | {r['experts_hit']:.1f} | {r['path']} | "
            f"{r['us_ours']:.1f} | {r['pct_floor_ours']:.0f}% | "
            f"{r.get('us_vllm_int4', nan):.1f} ({v4p:.1f}) | "
            f"{r.get('us_vllm_dense', nan):.1f} ({vdp:.1f}) | "
            f"{100 * r['floor_dense_us'] / vdp:.0f}% | "
            f"{v4p / r['us_ours']:.2f}x | {vdp / r['us_ours']:.2f}x | "
            f"{r['err_ours']:.1e} / {r.get('err_vllm_int4', nan):.1e} / "
            f"{r.get('err_vllm_dense', nan):.1e} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor", default=".anchor/vllm_fused_moe.py",
                    help="vLLM's fused_moe/fused_moe.py (read as text; none: ours only)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--routings", type=int, default=4)
    ap.add_argument("--sweep", action="store_true",
                    help="time the candidate launch rows (SWEEP) for ours, report the fastest")
    ap.add_argument("--sweep-set", default=None, choices=sorted(SWEEP),
                    help="with --sweep: this SWEEP list for every row (default: the row's path)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    anchor = load_anchor(args.anchor) if args.anchor and Path(args.anchor).exists() else None
    bw, peak = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, "
          f"fp16 matmul {peak / 1e12:.0f} TFLOP/s; torch {torch.__version__}", flush=True)
    rows = []
    tokens = [int(t) for t in args.tokens.split(",")]
    for name in args.shapes.split(","):
        shp = SHAPES[name]
        int4_total = shp["E"] * 3 * shp["H"] * shp["I"] // 2
        copies = max(1, -(-600_000_000 // int4_total))  # >= 600 MB of int4 experts in rotation
        rows += run_shape(name, shp, tokens, anchor, bw, peak, dtype, copies, args.routings,
                          sweep=args.sweep, sweep_set=args.sweep_set)
    md = (f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy "
          f"{bw / 1e12:.2f} TB/s, fp16 matmul {peak / 1e12:.0f} TFLOP/s (measured in this run). "
          f"Symmetric int4 group 128, {args.dtype}, uniform random routing, CUDA graphs.\n\n"
          + table(rows, args.dtype))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = next((t for t in ("h200", "h100", "a100", "l40") if t in
                    torch.cuda.get_device_name().lower()), "gpu")
        (out / f"bench_moe_{tag}.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), copy_bw=bw, peak_flops=peak,
                 dtype=args.dtype, rows=rows), indent=1))
        (out / f"bench_moe_{tag}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
