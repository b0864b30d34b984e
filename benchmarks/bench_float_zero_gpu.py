"""Float zero points on a CUDA GPU: native float-zp kernels vs integer kernel + exact correction.

Three ways to compute y = x @ ((q - 8)·s + z)^T, same weights, CUDA-graph replays, median:
* triton float : our Triton kernel reading float zeros itself;
* triton int+corr : our Triton kernel with zp = 8 (symmetric path) + ``group_sums(x) @ Z``
  (vllm_int4xpu/kernels/float_zero.py, the trick the XPU backend uses);
* tinygemm : torch's ``aten._weight_int4pack_mm`` (CUDA's native float-zp int4 op).
Also the eager (no graph) time of one Triton call at M = 1, to show Python launch overhead.

    python benchmarks/bench_float_zero_gpu.py [--shapes 4096x6144,4096x28672] [--ms 1,16,64,256]
"""

from __future__ import annotations

import argparse

import torch

from vllm_int4xpu.kernels.float_zero import add_float_zero_correction
from vllm_int4xpu.kernels.triton_backend import int4_matmul
from vllm_int4xpu.weight import ZeroKind, quantize_rtn, reference_linear, unpack_int4


def graph_us(fn, copies: int) -> float:
    """Median µs per call of ``fn(i)`` over ``copies`` distinct weight copies, in one CUDA graph."""
    import triton.testing

    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")
    return 1e3 * ms / copies


def eager_us(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x6144,4096x28672,14336x4096")
    ap.add_argument("--ms", default="1,16,64,256")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt, g = "cuda", torch.bfloat16, args.group
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, group {g}, bf16, float zeros")
    rows = []
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        w = quantize_rtn(torch.randn(N, K), g, ZeroKind.FLOAT).to(dev)
        copies = max(2, int(256e6 // (N * K // 2)))
        qw = [w.qweight.clone() for _ in range(copies)]
        sc = [w.scales.clone() for _ in range(copies)]
        zf = [w.zeros.to(dt).clone() for _ in range(copies)]
        z32 = [w.zeros.float().clone() for _ in range(copies)]
        codes = unpack_int4(w.qweight).to(torch.int32)
        packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # high nibble = even k
        tg_w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        tg = [tg_w.clone() for _ in range(copies)]
        sz = [torch.stack([w.scales, w.zeros.to(dt)], -1).contiguous() for _ in range(copies)]
        for M in map(int, args.ms.split(",")):
            x = torch.randn(M, K, device=dev, dtype=dt)
            ref = reference_linear(x.cpu(), w.to("cpu"))
            fns = {
                "triton float": lambda i: int4_matmul(x, qw[i], sc[i], zf[i], ZeroKind.FLOAT, g),
                "triton int+corr": lambda i: add_float_zero_correction(
                    int4_matmul(x, qw[i], sc[i], None, ZeroKind.NONE, g), x, z32[i], g),
                "tinygemm": lambda i: torch.ops.aten._weight_int4pack_mm(x, tg[i], g, sz[i]),
            }
            res = {}
            for name, fn in fns.items():
                err = float((fn(0).double().cpu() - ref).norm() / ref.norm())
                assert err < 2e-2, f"{name} wrong at {shape} M={M}: {err:.3g}"
                res[name] = (graph_us(fn, copies), err)
            eager = eager_us(lambda: fns["triton float"](0)) if M == 1 else float("nan")
            rows.append((shape, M, res, eager))
    print(f"\n{'K x N':>11} {'M':>4} | {'triton float':>12} {'int+corr':>9} {'tinygemm':>9} | "
          f"{'int+corr/float':>14} {'int+corr/tinygemm':>17} | {'eager M=1 µs':>12}")
    for shape, M, res, eager in rows:
        f, c, t = res["triton float"][0], res["triton int+corr"][0], res["tinygemm"][0]
        print(f"{shape:>11} {M:>4} | {f:12.1f} {c:9.1f} {t:9.1f} | {c / f:14.2f} {c / t:17.2f} | "
              f"{eager:12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
