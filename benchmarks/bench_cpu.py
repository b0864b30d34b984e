"""CPU backend crossover: torch's int4 op vs dequantize + dense GEMM vs bf16 F.linear.

Usage: python benchmarks/bench_cpu.py [--shapes 576x1536,1536x576] [--group 64]
Prints median milliseconds per call and ratios taken in this one run. No vLLM needed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vllm_int4xpu.kernels.base import Int4LinearSpec
from vllm_int4xpu.kernels.cpu import CpuKernel
from vllm_int4xpu.weight import quantize_rtn, reference_linear


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x1536,1536x576,2048x8192", help="KxN list")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--ms", default="1,4,16,32,64,128,256,512")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, group {args.group}, bf16")
    print(f"{'K x N':>12} {'M':>5} {'bf16 ms':>9} {'op ms':>9} {'dense ms':>9} "
          f"{'op/bf16':>8} {'dense/bf16':>10} {'best':>6} {'err':>8}")
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        w = quantize_rtn(torch.randn(N, K), args.group, "int")
        spec = Int4LinearSpec.of(w, torch.bfloat16, "cpu")
        kern = CpuKernel(spec)
        p = kern.prepare(w)
        t = [p[n] for n in CpuKernel.tensor_names]
        wb = torch.randn(N, K, dtype=torch.bfloat16)
        for M in map(int, args.ms.split(",")):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            bf = median_ms(lambda: F.linear(x, wb), args.reps)
            op = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, t[0], args.group, t[2]), args.reps)
            dense = median_ms(lambda: kern._dense_matmul(x, t[1], t[2]), args.reps)
            y = kern.apply(t, x)
            ref = reference_linear(x, w)
            err = float((y.double() - ref).norm() / ref.norm())
            best = "op" if op <= dense else "dense"
            print(f"{shape:>12} {M:>5} {bf:9.3f} {op:9.3f} {dense:9.3f} {op / bf:8.2f} {dense / bf:10.2f} {best:>6} {err:8.1e}")


if __name__ == "__main__":
    main()
