"""Host-side cost of one eager call (no CUDA graph) of the Triton backend, on a GPU machine.

    python3 benchmarks/tuning/eager_overhead.py [--profile]

Times back-to-back eager calls of a decode-sized layer (K = N = 4096, M = 1) through
``Int4Linear`` and through ``int4_matmul`` against ``F.linear`` in bf16, so the host cost per call
(Python + Triton launcher) shows next to the GPU time; ``--profile`` prints the cProfile top.
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_int4xpu.kernels import Int4Linear  # noqa: E402
from vllm_int4xpu.kernels.triton_backend import int4_matmul  # noqa: E402
from vllm_int4xpu.weight import ZeroKind, quantize_rtn  # noqa: E402


def per_call_us(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--m", type=int, default=1)
    a = ap.parse_args()
    K = N = 4096
    w = quantize_rtn(torch.randn(N, K), 128, ZeroKind.INT, scale_dtype=torch.bfloat16)
    x = torch.randn(a.m, K, dtype=torch.bfloat16, device="cuda")
    dense = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    layer = Int4Linear(w.to("cuda"), torch.bfloat16, "cuda", backend="triton")
    wc = w.to("cuda")
    calls = {"F.linear bf16": lambda: F.linear(x, dense),
             "Int4Linear (triton)": lambda: layer(x),
             "int4_matmul": lambda: int4_matmul(x, wc.qweight, wc.scales, wc.zeros, wc.zero_kind,
                                                128)}
    from vllm_int4xpu.kernels.triton_backend import choose_config, device_family
    from vllm_int4xpu.kernels.triton_kernels import ALGORITHMS
    algo, cfg = choose_config(device_family(x.device), a.m, K, N, 128)
    out = torch.empty(a.m, N, dtype=x.dtype, device="cuda")
    if algo in ALGORITHMS:  # the bare launcher: Triton's own launch cost + our grid set-up
        calls[f"{algo} launcher only"] = lambda: ALGORITHMS[algo](
            x, wc.qweight, wc.scales, wc.zeros, 1, 128, None, out, **cfg)
    print(f"eager, back-to-back, K = N = {K}, M = {a.m}, bf16 (µs per call)")
    for name, fn in calls.items():
        print(f"  {name:<22} {per_call_us(fn):8.1f}")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(300):
            layer(x)
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
