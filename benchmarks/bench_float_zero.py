"""What does the float-zero correction cost? CPU measurement (no vLLM, plain torch).

Float zero points (w = (q - 8)·s + z) can be served two ways:

* native: a kernel that takes float zeros itself. On CPU that is
  ``aten._weight_int4pack_mm_for_cpu(x, W, g, scale_and_zero [K/g, N, 2])``.
* int + correction: an integer-zero-point kernel run with zp = 8, plus the exact correction
  ``y += group_sums(x) @ Z`` (vllm_int4xpu/kernels/float_zero.py). CPU has no separate integer-zp
  int4 op, so the "int kernel" here is the same CPU op with all-zero float zeros (which computes
  exactly (q - 8)·s, i.e. zp = 8) — the kernel's speed does not depend on the zero values, so the
  difference between the two columns is the correction's cost.

On XPU the native float-zp op dequantizes the whole weight for M > 1 (DESIGN.md §3), so there the
comparison is against a far slower native path; this CPU table isolates the correction overhead.

    python benchmarks/bench_float_zero.py [--shapes 4096x4096,4096x11008] [--groups 32,128]
"""

from __future__ import annotations

import argparse
import time

import torch

from vllm_int4xpu.kernels.float_zero import add_float_zero_correction
from vllm_int4xpu.weight import ZeroKind, quantize_rtn, reference_linear, unpack_int4


def bench_interleaved(fns: dict, rounds: int = 30, sample_s: float = 2e-3) -> dict:
    """Best-of-``rounds`` seconds per call for each fn, the fns timed in turn within each round.

    Min (not median) and interleaving because CI machines are shared: other jobs only ever make a
    sample slower, and interleaving exposes every candidate to the same background load.
    """
    reps = {}
    for name, fn in fns.items():  # warm up, and size each sample to about sample_s
        fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(sample_s / max(time.perf_counter() - t0, 1e-7)))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / reps[name])
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN list")
    ap.add_argument("--groups", default="32,128")
    ap.add_argument("--ms", default="1,8,64,256")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rounds", type=int, default=30, help="timing rounds per cell (best kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, act dtype {args.dtype}")
    hdr = (f"{'K':>5} {'N':>6} {'g':>4} {'M':>4} | {'native fzp ms':>13} {'int+corr ms':>11} "
           f"{'corr ms':>8} | {'ratio int+corr/native':>21} | {'bf16 linear ms':>14}")
    print(hdr)
    print("-" * len(hdr))
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x"))
        dense = torch.randn(N, K)
        w_dense_bf = dense.to(dtype)
        for g in (int(v) for v in args.groups.split(",")):
            w = quantize_rtn(dense, g, ZeroKind.FLOAT, scale_dtype=dtype)
            codes = unpack_int4(w.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scales = w.scales.to(dtype)
            sz_native = torch.stack([scales, w.zeros.to(dtype)], -1).contiguous()
            sz_int = torch.stack([scales, torch.zeros_like(scales)], -1).contiguous()  # zp = 8
            zf = w.zeros.to(torch.float32).contiguous()
            for M in (int(v) for v in args.ms.split(",")):
                x = torch.randn(M, K).to(dtype)
                native = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz_native)
                int_only = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz_int)
                y_int = int_only()
                corrected = lambda: add_float_zero_correction(int_only(), x, zf, g)
                corr_only = lambda: add_float_zero_correction(y_int, x, zf, g)
                # Both paths must be right before they are timed.
                ref = reference_linear(x, w)
                for name, y in (("native", native()), ("int+corr", corrected())):
                    err = float((y.double() - ref).norm() / ref.norm())
                    assert err < 2e-2, f"{name} wrong: rel err {err:.3g}"
                t = bench_interleaved({"native": native, "corrected": corrected, "corr": corr_only,
                                       "bf16": lambda: torch.nn.functional.linear(x, w_dense_bf)},
                                      rounds=args.rounds)
                t_nat, t_cor, t_c, t_bf = t["native"], t["corrected"], t["corr"], t["bf16"]
                print(f"{K:>5} {N:>6} {g:>4} {M:>4} | {t_nat * 1e3:>13.3f} {t_cor * 1e3:>11.3f} "
                      f"{t_c * 1e3:>8.3f} | {t_cor / t_nat:>21.3f} | {t_bf * 1e3:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
