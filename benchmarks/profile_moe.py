"""Where one int4 MoE layer's time goes: device time per kernel (torch.profiler), ours and vLLM's
dense anchor, beside the CUDA-graph time per layer, on the bench_moe.py shapes and weights.

    python benchmarks/profile_moe.py --tokens 1,4,16 [--anchor .anchor/vllm_fused_moe.py]
    python benchmarks/profile_moe.py --config '{"S13": 4}'   # a launch row override, merged

Kernel times are taken eagerly (calls back to back over weight copies, so L2 holds none), the
graph time as in bench_moe.py; their difference is the cost of launching and of the gaps.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_moe as bm  # noqa: E402
from bench_kernels import time_graph  # noqa: E402


def kernel_times(fn, calls: int) -> dict[str, float]:
    """Mean device µs per call of each kernel name fn launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    tot = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name[:40]] += ev.device_time_total if hasattr(ev, "device_time_total") else \
                ev.cuda_time_total
    return {k: v / calls for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--shapes", default=",".join(bm.SHAPES))
    ap.add_argument("--anchor", default=None)
    ap.add_argument("--config", default=None, help="JSON merged into the dispatcher's row")
    args = ap.parse_args()
    anchor = bm.load_anchor(args.anchor) if args.anchor else None
    over = json.loads(args.config) if args.config else {}
    dtype = torch.float16
    for name in args.shapes.split(","):
        shp = bm.SHAPES[name]
        E, k, H, I = shp["E"], shp["k"], shp["H"], shp["I"]
        copies = max(1, -(-600_000_000 // (E * 3 * H * I // 2)))
        layers = [bm.make_layer(E, H, I, dtype, 128, seed=c) for c in range(copies)]
        spec = bm.Int4MoESpec.of(*layers[0], dtype, "cuda")
        kern = bm.TritonMoEKernel(spec)
        ts = []
        for w13, w2 in layers:
            t = kern.prepare(w13, w2)
            ts.append([t[n] for n in kern.tensor_names])
        dense = None
        if anchor is not None:
            dense = [dict(b13=torch.stack([bm.dequantize(w13.expert(e), dtype) for e in range(E)]),
                          b2=torch.stack([bm.dequantize(w2.expert(e), dtype) for e in range(E)]))
                     for w13, w2 in layers[:2]]
        for M in (int(t) for t in args.tokens.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(M)
            x = torch.randn(M, H, device="cuda", dtype=dtype, generator=gen)
            ids = torch.rand(M, E, device="cuda", generator=gen).argsort(dim=1)[:, :k]
            tw = torch.rand(M, k, device="cuda", generator=gen)
            tw, ids = tw / tw.sum(1, keepdim=True), ids.to(torch.int32)
            cfg = dict(bm.choose_moe_config(M * k, E, H, I), **over)
            ref = bm.reference_moe(x, *layers[0], tw, ids)
            err = bm.rel(kern.apply(ts[0], x, tw, ids, config=cfg), ref)
            state = {"i": 0}

            def ours():
                state["i"] = (state["i"] + 1) % copies
                return kern.apply(ts[state["i"]], x, tw, ids, config=cfg)
            kt = kernel_times(ours, 4 * copies)
            g = time_graph([(lambda c=c: kern.apply(ts[c], x, tw, ids, config=cfg))
                            for c in range(copies)])
            print(f"{name} M={M} ours graph {g:7.1f} us  kernels {sum(kt.values()):7.1f} us  "
                  f"err {err:.1e}  cfg {cfg}")
            for kn, us in kt.items():
                print(f"    {us:7.1f}  {kn}")
            if dense is not None:
                def vd():
                    return bm.vllm_moe(anchor, "dense", dense[0], x, tw, ids, E, 128)
                kt = kernel_times(vd, 8)
                print(f"{name} M={M} vLLM dense kernels {sum(kt.values()):7.1f} us (L2 warm)")
                for kn, us in kt.items():
                    print(f"    {us:7.1f}  {kn}")
        layers = ts = dense = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
