"""One profiled MoE layer call (backend ``triton``) for Nsight Compute: every launch of it.

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats \
        python3 benchmarks/tuning/ncu_moe.py --shape Qwen3-30B-A3B --tokens 1 [--cfg JSON]

The layer is bench_moe.py's (symmetric int4 group 128, fp16, uniform random top-k routing);
``--cfg`` replaces the dispatcher's launch row. Only the call between cudaProfilerStart/Stop is
profiled (after a warm-up that compiles); Nsight Compute flushes the caches before each kernel.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_moe import SHAPES, make_layer  # noqa: E402
from vllm_int4xpu.kernels.moe_base import Int4MoESpec  # noqa: E402
from vllm_int4xpu.kernels.moe_triton import TritonMoEKernel, choose_moe_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="Qwen3-30B-A3B", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--cfg", default=None, help="JSON launch row (default: the dispatcher's)")
    a = ap.parse_args()
    s = SHAPES[a.shape]
    E, k, H, I = s["E"], s["k"], s["H"], s["I"]
    w13, w2 = make_layer(E, H, I, torch.float16, 128, seed=0)
    kern = TritonMoEKernel(Int4MoESpec.of(w13, w2, torch.float16, "cuda"))
    t = kern.prepare(w13, w2)
    tensors = [t[n] for n in kern.tensor_names]
    gen = torch.Generator(device="cuda").manual_seed(a.tokens)
    x = torch.randn(a.tokens, H, device="cuda", dtype=torch.float16, generator=gen)
    ids = torch.rand(a.tokens, E, device="cuda", generator=gen).argsort(dim=1)[:, :k]
    tw = torch.rand(a.tokens, k, device="cuda", generator=gen)
    tw = tw / tw.sum(1, keepdim=True)
    ids = ids.to(torch.int32)
    cfg = json.loads(a.cfg) if a.cfg else choose_moe_config(a.tokens * k, E, H, I)
    print(f"{a.shape} tokens {a.tokens}: {cfg}", flush=True)
    kern.apply(tensors, x, tw, ids, config=cfg)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    kern.apply(tensors, x, tw, ids, config=cfg)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
