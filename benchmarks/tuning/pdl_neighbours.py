"""What programmatic dependent launch (PDL) buys next to other kernels, not only itself (GPU).

    python3 benchmarks/tuning/pdl_neighbours.py --ms 1,16

bench_kernels.py times back-to-back calls of the int4 GEMM, so with PDL each call's start
overlaps the previous call's tail. In a model the kernel before a linear layer is something else
(a norm, an activation), which does not trigger early. Per shape and M this prints the µs per call
of the table's row with PDL on and off, in CUDA graphs of

* ``alone``:  GEMM, GEMM, ... (one per weight copy, as bench_kernels.py);
* ``between``: norm, GEMM, norm, GEMM, ... where the norm is an RMSNorm-like torch op on x (its own
  time, measured in a graph of norms only, is subtracted);

so the gain that carries over to a model is the ``between`` column.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_kernels
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_kernels import GROUP, SHAPES, time_graph, tuned_rows  # noqa: E402
from vllm_int4xpu.kernels.triton_backend import int4_matmul  # noqa: E402


def norm_(x):
    """An RMSNorm-like op on x in place (a few small kernels that read and write x)."""
    x.mul_(torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ms", default="1,16")
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}  µs per GEMM call (PDL off -> on, ratio)")
    print(f"{'K x N':>12} {'M':>4} {'alone off':>9} {'on':>7} {'ratio':>6} | "
          f"{'between off':>11} {'on':>7} {'ratio':>6}")
    for K, N, ws, M, algo, cfg in tuned_rows(SHAPES, [int(m) for m in a.ms.split(",")]):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        t_norm = time_graph([lambda: norm_(x) for _ in ws])
        res = {}
        for pdl in (False, True):
            kw = dict(cfg, PDL=pdl)

            def gemm(w, kw=kw):
                return int4_matmul(x, w.qweight, w.scales, w.zeros, w.zero_kind, GROUP,
                                   algo=algo, **kw)

            def both(w, gemm=gemm):
                norm_(x)
                return gemm(w)

            res[pdl] = (time_graph([lambda w=w: gemm(w) for w in ws]),
                        time_graph([lambda w=w: both(w) for w in ws]) - t_norm)
        (a0, b0), (a1, b1) = res[False], res[True]
        print(f"{K:>5} x {N:<5} {M:>4} {a0:9.2f} {a1:7.2f} {a1 / a0:6.2f} | "
              f"{b0:11.2f} {b1:7.2f} {b1 / b0:6.2f}   {algo} {cfg}", flush=True)


if __name__ == "__main__":
    main()
