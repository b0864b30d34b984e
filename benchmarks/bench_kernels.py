"""Benchmark the Triton int4 GEMM against cuBLAS bf16, torch tinygemm and GemLite, with floors.

    python benchmarks/bench_kernels.py            # full table (4 shapes x 12 M values)
    python benchmarks/bench_kernels.py --quick    # subset
    python benchmarks/bench_kernels.py --tune vllm_int4xpu/kernels/triton_configs/cuda_h100.json

All contenders use the same weights (RTN, group 128, float zero points w = (q-8)*s + z, the
only kind tinygemm takes). Each timing is a CUDA graph of one call per distinct weight copy
(enough copies to overflow the L2), replayed; the median replay / copies is reported.
floor = max(bytes moved / measured copy bandwidth, 2*M*N*K / measured bf16 GEMM peak).
Imports no vLLM.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_int4xpu.kernels.triton_backend import (choose_config, device_family,  # noqa: E402
                                                 int4_matmul)
from vllm_int4xpu.weight import ZeroKind, dequantize, quantize_rtn, unpack_int4  # noqa: E402

SHAPES = [(4096, 6144), (4096, 28672), (14336, 4096), (8192, 57344)]  # K x N
TUNE_SHAPES = [(4096, 28672), (14336, 4096), (4096, 6144), (8192, 57344)]
TUNE_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192]
QUICK_SHAPES = [(4096, 28672), (14336, 4096)]
QUICK_MS = [1, 16, 64, 2048]
GROUP = 128
L2_DEFEAT_BYTES = 256 << 20  # H100 L2 is 50 MB; cycle through >= 256 MB of weights


def int4_bytes(K, N):
    """Bytes of the int4 weight with bf16 scales and zeros (group GROUP)."""
    return N * K // 2 + 2 * (K // GROUP) * N * 2


def graph_copies(nbytes, most=48):
    """Distinct copies of ``nbytes`` one CUDA graph cycles through to defeat the L2 (2..most)."""
    return max(2, min(most, math.ceil(L2_DEFEAT_BYTES / nbytes)))


# ------------------------------------------------------------------------------------ timing
def _capture(fns):
    """A CUDA graph that calls each fn once (warmed up outside capture first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm-up outside capture (compiles, autotunes, allocator)
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def _replay_for(graphs, seconds=0.05):
    """Replays the graphs in turn for >= ``seconds``: the first item timed after a pause
    (inputs, the float64 reference) otherwise reads up to ~10 % slow on the short decode graphs
    (the same config timed first and again later in one sweep: 94-96 vs 85-87 µs, H100)."""
    t_end = time.perf_counter() + seconds
    n = 0
    while n < 3 or time.perf_counter() < t_end:
        for g in graphs:
            g.replay()
        torch.cuda.synchronize()
        n += 1


def _time_replay(g, calls):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / calls


def time_graph(fns, reps=20):
    """Median µs per call of a CUDA graph that calls each fn once (one per weight copy)."""
    g = _capture(fns)
    _replay_for([g])
    times = [_time_replay(g, len(fns)) for _ in range(reps)]
    del g
    return statistics.median(times)


def time_graphs_interleaved(named_fns, reps=20):
    """{name: median µs per call} for several contenders timed round-robin: each a graph as in
    :func:`time_graph`, all warmed up together, then one replay of each per round, so clock and
    thermal drift fall on every contender alike and none is favoured by its place in the row."""
    graphs = {name: (_capture(fns), len(fns)) for name, fns in named_fns.items()}
    _replay_for([g for g, _ in graphs.values()], seconds=0.1)
    times = {name: [] for name in graphs}
    for _ in range(reps):
        for name, (g, n) in graphs.items():
            times[name].append(_time_replay(g, n))
    graphs = None
    return {name: statistics.median(t) for name, t in times.items()}


def measure_floors():
    """(copy bandwidth B/s, bf16 GEMM peak FLOP/s), measured here."""
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    t = time_graph([lambda: dst.copy_(buf)], reps=10)
    bw = 2 * buf.numel() / (t * 1e-6)
    buf = dst = None  # frees them (the timed lambda closes over these names)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = time_graph([lambda: a @ b], reps=10)
    peak = 2 * 8192 ** 3 / (t * 1e-6)
    return bw, peak


# ------------------------------------------------------------------------------------ anchors
def tinygemm_pack(w):
    """torch tinygemm operands from a float-zero canonical weight (CUDA only)."""
    codes = unpack_int4(w.qweight).to(torch.int32)  # [N, K]
    u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # high nibble = even k
    packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
    sz = torch.stack([w.scales, w.zeros], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return packed, sz


def gemlite_linear(w):
    """GemLite A16W4 layer on the same weight: w = (q - z')*s with z' = 8 - z/s."""
    import gemlite
    s = w.scales.float()
    zq = 8.0 - w.zeros.float() / s
    codes = unpack_int4(w.qweight)  # uint8 [N, K]
    return gemlite.helper.A16Wn(device=str(w.qweight.device), dtype=torch.bfloat16).from_weights(
        codes, s.t().contiguous().to(torch.bfloat16), zq.t().contiguous().to(torch.bfloat16),
        W_nbits=4, group_size=GROUP)


@triton.jit
def read_kernel(p, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Sum of n int32 (only to keep the loads): the read-only anchor."""
    base = tl.program_id(0) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(p + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(out + tl.program_id(0), tl.sum(acc))


def read_anchor_us(nbytes, copies):
    """Best time of one Triton kernel that only reads ``nbytes`` (16-byte loads, summed), over
    ``copies`` distinct buffers in one graph: what any kernel moving those bytes can reach here
    (launch, ramp-up and tail included), against which the byte floor can be put in context."""
    n = nbytes // 4
    bufs = [torch.randint(0, 1 << 30, (n,), dtype=torch.int32, device="cuda")
            for _ in range(copies)]
    out = torch.empty(n // 256 + 1, dtype=torch.int32, device="cuda")
    best = float("inf")
    for block, iters, nw in ((1024, 1, 4), (1024, 4, 4), (2048, 4, 8), (1024, 16, 4),
                             (4096, 2, 8)):
        grid = (triton.cdiv(n, block * iters),)
        best = min(best, time_graph([lambda b=b: read_kernel[grid](b, out, n, BLOCK=block,
                                                                    ITERS=iters, num_warps=nw)
                                     for b in bufs]))
    del bufs
    return best


def have_gemlite():
    try:
        import gemlite
    except Exception as e:  # noqa: BLE001
        print(f"# GemLite unavailable: {type(e).__name__}: {e}")
        return False
    # GemLite picks its shipped config by device name and ships none for the H200; without one
    # it autotunes inside the first timed call. The H200 is an H100 chip with faster memory
    # (sm_90, 132 SMs), so it gets GemLite's H100 table, as our own kernels get ours.
    tag = getattr(gemlite.core, "selected_tag", None)
    if tag is None and torch.cuda.get_device_capability() == (9, 0):
        tag = str(Path(gemlite.__file__).with_name("configs") / "h100.json")
        gemlite.load_config(tag)
    print(f"# GemLite {getattr(gemlite, '__version__', '?')}, config "
          f"{Path(tag).name if tag else 'none (autotunes on first call)'}")
    return True


# ------------------------------------------------------------------------------------ main
def make_weights(K, N, copies):
    torch.manual_seed(0)
    w0 = quantize_rtn(torch.randn(N, K, device="cuda") * 0.02, GROUP, ZeroKind.FLOAT)
    return [w0] + [replace(w0, qweight=w0.qweight.clone(), scales=w0.scales.clone(),
                           zeros=w0.zeros.clone()) for _ in range(copies - 1)]


def tuned_rows(shapes, ms, most=24):
    """(K, N, weight copies, M, algo, cfg) per shape and M, with the dispatcher's row for it;
    each shape's copies (enough to defeat the L2, at most ``most``) are freed after its Ms."""
    fam = device_family(torch.device("cuda"))
    for K, N in shapes:
        ws = make_weights(K, N, graph_copies(N * K // 2, most=most))
        for M in ms:
            algo, cfg = choose_config(fam, M, K, N, GROUP)
            yield K, N, ws, M, algo, cfg
        del ws
        torch.cuda.empty_cache()


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def bench_shape(K, N, ms, bw, peak, use_gemlite, rows):
    wbytes = int4_bytes(K, N)
    copies = graph_copies(wbytes)
    bf16_copies = graph_copies(2 * N * K)
    ws = make_weights(K, N, copies)
    dense = dequantize(ws[0], torch.float32)
    dense_bf16 = [dense.to(torch.bfloat16) for _ in range(bf16_copies)]
    tg = [tinygemm_pack(w) for w in ws]
    gl = None
    if use_gemlite:
        try:
            gl = [gemlite_linear(w) for w in ws]
        except Exception as e:  # noqa: BLE001
            print(f"# GemLite pack failed: {type(e).__name__}: {e}")
    fam = device_family(torch.device("cuda"))
    read_us = read_anchor_us(wbytes, copies)
    print(f"# {K}x{N}: reading the same {wbytes / 1e6:.1f} MB in one Triton kernel "
          f"(nothing else) takes {read_us:.2f} us = {100 * wbytes / bw * 1e6 / read_us:.0f}% "
          "of the byte floor", flush=True)
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = x.float() @ dense.t()
        res = {}
        res["ours"] = time_graph([lambda w=w: int4_matmul(x, w.qweight, w.scales, w.zeros,
                                                          w.zero_kind, GROUP) for w in ws])
        e_ours = rel_err(int4_matmul(x, ws[0].qweight, ws[0].scales, ws[0].zeros,
                                     ws[0].zero_kind, GROUP), ref)
        res["bf16"] = time_graph([lambda d=d: F.linear(x, d) for d in dense_bf16])
        res["tinygemm"] = time_graph([lambda p=p: torch.ops.aten._weight_int4pack_mm(
            x, p[0], GROUP, p[1]) for p in tg])
        e_tg = rel_err(torch.ops.aten._weight_int4pack_mm(x, tg[0][0], GROUP, tg[0][1]), ref)
        e_gl = float("nan")
        if gl is not None:
            try:
                res["gemlite"] = time_graph([lambda g=g: g(x) for g in gl])
                e_gl = rel_err(gl[0](x), ref)
            except Exception as e:  # noqa: BLE001
                print(f"# GemLite run failed at M={M}: {type(e).__name__}: {e}")
        nbytes = wbytes + 2 * M * K + 2 * M * N
        floor = max(nbytes / bw, 2 * M * N * K / peak) * 1e6
        algo, cfg = choose_config(fam, M, K, N, GROUP)
        rows.append(dict(K=K, N=N, M=M, floor_us=floor, read_us=read_us, algo=algo,
                         err_ours=e_ours,
                         err_tinygemm=e_tg, err_gemlite=e_gl,
                         **{f"{k}_us": v for k, v in res.items()}))
        r = rows[-1]
        print(fmt_row(r), flush=True)
        x = ref = None


HEADER = ("   K     N     M  floor_us | ours_us %floor xbf16 algo    | bf16_us %fl |"
          " tinygemm_us %fl | gemlite_us %fl | err_ours  err_tg   err_gl")


def fmt_row(r):
    fl = r["floor_us"]

    def pc(k):
        v = r.get(f"{k}_us")
        return (f"{v:10.1f} {100 * fl / v:4.0f}%") if v else f"{'-':>10} {'-':>4} "
    o = r["ours_us"]
    return (f"{r['K']:5d} {r['N']:5d} {r['M']:5d} {fl:9.1f} | {o:7.1f} {100 * fl / o:5.0f}% "
            f"{r['bf16_us'] / o:5.2f} {r['algo']:7s} |{pc('bf16')} |{pc('tinygemm')}      |"
            f"{pc('gemlite')}"
            f"     | {r['err_ours']:.1e} {r['err_tinygemm']:.1e} {r['err_gemlite']:.1e}")


# ------------------------------------------------------------------------------------ tuning
def tune_candidates(M):
    """The search space per M bucket (kept small: every distinct config is a Triton compile)."""
    cands = []
    if M <= 4:  # CUDA-core GEMV, M rows of x per program: (BLOCK_N, BLOCK_K, num_warps)
        # (BLOCK_K is clipped to the group size, 128 here: rows per thread set the bytes in flight)
        # (more words per thread: fewer instructions per weight but more registers, so fewer
        # warps to hide load latency; the GEMV is latency-bound, so both ends are searched)
        shapes = {1: ((64, 128, 2), (128, 128, 2), (128, 128, 4), (256, 128, 4), (128, 64, 2),
                      (256, 64, 4), (64, 64, 2), (128, 64, 4)),
                  2: ((64, 128, 2), (64, 128, 1), (128, 128, 4), (64, 64, 1), (32, 64, 1),
                      (128, 64, 2), (64, 64, 2)),
                  4: ((32, 128, 2), (64, 128, 4), (32, 128, 1))}[M]
        # STAGES 1: tiles double-buffered in registers; >= 2: the compiler's cp.async pipeline
        cands += [dict(algo="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, ROWS=M, STAGES=st,
                       num_warps=nw, num_stages=3)
                  for bn, bk, nw in shapes for sk in (4, 8, 16)
                  for st in ((1, 3, 4) if M <= 2 else (1, 3))]
        if M == 1:
            return cands  # the tensor-core path never won at M = 1
    if M <= 16:  # tensor cores, one BLOCK_M = 16 tile
        for bn in (64, 128):
            for bk in (64, 128):
                for sk in (2, 4, 8):
                    cands.append(dict(algo="gemm", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                                      SPLIT_K=sk, num_warps=4, num_stages=3))
    elif M <= 512:
        bms = {32: [32], 64: [32, 64], 128: [64, 128], 256: [128], 512: [128]}[M]
        for bm in bms:
            for bn in (64, 128, 256):
                for bk in (64, 128):
                    for sk in ((1, 2, 4) if M <= 64 else (1, 2)):  # M 128: split 2 won on K 14336
                        if bm == 128 and bn == 256 and bk == 128:
                            continue
                        nw = 8 if (bn == 256 or bm == 128) else 4
                        cands.append(dict(algo="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                          SPLIT_K=sk, num_warps=nw, num_stages=3))
                        if nw == 4 and bn == 128:  # 254 -> 127 registers at BM 64 (sm_90)
                            cands.append(dict(cands[-1], num_warps=8))
    else:  # large M: big tensor-core tiles against dequantize + cuBLAS
        for bm, bn in ((256, 128), (128, 256), (128, 128)):
            for ns in (3, 4):
                cands.append(dict(algo="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=1,
                                  num_warps=8, num_stages=ns))
        # K tiles of 128 (the fragment layout's natural tile) for the FRAG variants below
        cands += [dict(algo="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=1, num_warps=8,
                       num_stages=3) for bm, bn in ((128, 128), (128, 256), (256, 128))]
    # the same tensor-core tiles with the weight unpacked straight into MMA-fragment order and
    # dequantized as packed bf16 pairs (FRAG 2; FRAG 1, the fp32 route, lost to it on H100), and
    # capped at 72 registers (7 instead of 6 CTAs per SM for the 4-warp tiles at M <= 64)
    frag = [dict(c, FRAG=2) for c in cands if c["algo"] == "gemm" and c["BLOCK_K"] >= 32
            and c["BLOCK_N"] % (16 * c["num_warps"]) == 0 and c["BLOCK_M"] <= 256]
    capped = [dict(c, maxnreg=72) for c in frag
              if c["BLOCK_M"] <= 64 and c["BLOCK_N"] == 64 and c["num_warps"] == 4]
    # and with the K splits of an N tile side by side in the grid (K_FASTEST: 5-16 % faster on
    # 8192x57344 at M <= 16 with FRAG 2, neutral on the other shapes; ab_k_fastest_frag2.txt)
    cands += frag + capped + [dict(c, K_FASTEST=1) for c in frag + capped
                              if c["SPLIT_K"] > 1 and c["BLOCK_M"] <= 64]
    # and as a persistent grid (PERSIST programs per SM walking the tiles): won 3-16 % at
    # M = 32..256 for the rows without split-K (sweep_persist_post_scale_h100.txt), lost at M <= 16
    if M >= 32:
        cands += [dict(c, PERSIST=p) for c in list(cands) if c["algo"] == "gemm"
                  and c["SPLIT_K"] == 1 and "maxnreg" not in c for p in (2, 3, 5)]
    if M >= 256:
        cands += [dict(algo="dequant", BLOCK_N=64, BLOCK_K=128, num_warps=4, CHUNK_N=c)
                  for c in (0, 2048, 4096, 8192)]
    return cands


def tune(path, shapes, ms, budget_s, algos=None):
    table = json.loads(Path(path).read_text()) if Path(path).exists() else {"default": {}}
    shapes_tbl = table.setdefault("shapes", {})
    t_end = time.time() + budget_s
    for K, N in shapes:
        copies = graph_copies(N * K // 2, most=24)
        ws = make_weights(K, N, copies)
        ent = shapes_tbl.setdefault(f"{K}x{N}", {})
        for M in ms:
            if time.time() > t_end:
                print("# tuning budget spent", flush=True)
                break
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            best = None
            cands = [c for c in tune_candidates(M) if algos is None or c["algo"] in algos]
            if algos is not None:  # a partial search must beat the table's current choice
                algo0, cfg0 = choose_config(device_family(x.device), M, K, N, GROUP)
                cands.insert(0, dict(cfg0, algo=algo0))
            for c in cands:
                c = dict(c)
                algo = c.pop("algo")
                try:
                    t = time_graph([lambda w=w: int4_matmul(x, w.qweight, w.scales, w.zeros,
                                                            w.zero_kind, GROUP, algo=algo, **c)
                                    for w in ws], reps=5)
                except Exception as e:  # noqa: BLE001  (e.g. out of shared memory)
                    print(f"#   skip {algo} {c}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, dict(algo=algo, **c))
            print(f"tune K={K} N={N} M={M}: {best}", flush=True)
            if best:
                ent[str(M)] = best[1]
        Path(path).write_text(json.dumps(table, indent=1))
        del ws
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", metavar="JSON", help="sweep configs and write the table here")
    ap.add_argument("--tune-budget", type=float, default=400)
    ap.add_argument("--tune-algos", default=None,
                    help="search only these algorithms (e.g. gemm); the table's current row "
                         "competes too, so a row is only replaced by something faster")
    ap.add_argument("--no-gemlite", action="store_true")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x6144,14336x4096")
    ap.add_argument("--ms", default=None, help="e.g. 1,16,64")
    ap.add_argument("--json", default=None, help="also write rows as JSON here")
    ap.add_argument("--read-anchor", action="store_true",
                    help="only time the read-only anchor per shape (see read_anchor_us)")
    a = ap.parse_args()
    shapes = QUICK_SHAPES if a.quick else SHAPES
    ms = QUICK_MS if a.quick else MS
    if a.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    if a.ms:
        ms = [int(v) for v in a.ms.split(",")]
    if a.tune:
        tune(a.tune, shapes if a.shapes else TUNE_SHAPES, ms if a.ms else TUNE_MS, a.tune_budget,
             a.tune_algos.split(",") if a.tune_algos else None)
        return
    if a.read_anchor:
        bw, _ = measure_floors()
        for K, N in shapes:
            nbytes = int4_bytes(K, N)
            t = read_anchor_us(nbytes, graph_copies(nbytes))
            print(f"read-only {K}x{N}: {nbytes / 1e6:.1f} MB in {t:.2f} us = "
                  f"{100 * nbytes / bw * 1e6 / t:.0f}% of the byte floor ({bw / 1e9:.0f} GB/s)")
        return
    fam = device_family(torch.device("cuda"))
    print(f"# device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}  family {fam}")
    bw, peak = measure_floors()
    print(f"# measured copy bandwidth {bw / 1e9:.0f} GB/s, bf16 GEMM peak {peak / 1e12:.0f} "
          f"TFLOP/s; group {GROUP}, bf16, float zeros; CUDA-graph replays over >= 256 MB of "
          "weight copies")
    use_gl = not a.no_gemlite and have_gemlite()
    print(HEADER)
    rows = []
    for K, N in shapes:
        bench_shape(K, N, ms, bw, peak, use_gl, rows)
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(dict(bw=bw, peak=peak, rows=rows), indent=1))


if __name__ == "__main__":
    main()
