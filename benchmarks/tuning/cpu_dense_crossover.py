"""Where the cpu_native kernel's bf16 calls should leave the VDPBF16PS path for the dequantize +
GEMM path on a CPU without AMX (``DP_DENSE_MIN_M`` / ``DP_DENSE_MIN_M_SMALL``): both paths and
bf16 ``F.linear`` timed round-robin in one run (one call of each per round, median over rounds),
per shape and M.

    .venv/bin/python benchmarks/tuning/cpu_dense_crossover.py [--preset smollm2,1b]
                                                              [--ms 128,256,384,512,1024]

Prints median ms of ``bf16``, ``dp`` (the VDPBF16PS path at this M) and ``dense`` (w dequantized
into the reused buffer, torch's GEMM of x @ w^T), each path's speed relative to bf16, and which
path is faster. Group 64, integer zero points.

``--chunks 256,1024`` also times the dense path done in chunks of that many channels (each chunk
dequantized into a small buffer that stays in cache, one GEMM per chunk into y's columns; equal
to the whole-layer dense path, bit for bit), printed as each chunking's speed relative to bf16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cpu import PRESETS  # noqa: E402
from vllm_int4xpu.kernels import cpu_native  # noqa: E402
from vllm_int4xpu.kernels.base import Int4LinearSpec  # noqa: E402
from vllm_int4xpu.weight import ZeroKind, quantize_rtn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2,1b", help="bench_cpu.py presets, comma-separated")
    ap.add_argument("--ms", default="128,256,384,512,1024")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--chunks", default="", help="channels per chunk of a chunked dense path")
    args = ap.parse_args()
    if not cpu_native.dp_built() or cpu_native.amx_enabled():
        raise SystemExit("needs a CPU with AVX512-BF16 and without AMX (the dense path's case)")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, group 64, bf16")
    print(f"{'K x N':>11} {'M':>5} {'bf16 ms':>8} {'dp ms':>8} {'dense ms':>8} "
          f"{'dp x bf16':>9} {'dns x bf16':>10}  faster")
    for preset in args.preset.split(","):
        for shape in PRESETS[preset].split(","):
            K, N = map(int, shape.split("x"))
            w = quantize_rtn(torch.randn(N, K) * 0.05, 64, ZeroKind.INT)
            kern = cpu_native.CpuNativeKernel(Int4LinearSpec.of(w, torch.bfloat16, "cpu"))
            prepared = kern.prepare(w)
            tensors = [prepared[n] for n in kern.tensor_names]
            wd = torch.randn(N, K, dtype=torch.bfloat16)
            chunks = [int(c) for c in args.chunks.split(",") if c]

            def path(dense_from):  # either path at every M, whatever the layer's size
                def run(x):
                    cpu_native.DP_DENSE_MIN_M = cpu_native.DP_DENSE_MIN_M_SMALL = dense_from
                    return kern.apply(tensors, x)
                return run
            for M in map(int, args.ms.split(",")):
                x = torch.randn(M, K, dtype=torch.bfloat16)
                fns = {"bf16": lambda x: F.linear(x, wd), "dp": path(1 << 30), "dense": path(1)}
                fns.update({f"c{c}": chunked(prepared["qb"], prepared["sb"], N, K, c)
                            for c in chunks})
                if chunks:
                    ref = fns["dense"](x)
                    assert all(torch.equal(fns[f"c{c}"](x), ref) for c in chunks)
                times = {k: [] for k in fns}
                for fn in fns.values():
                    fn(x)
                for _ in range(args.rounds):
                    for k, fn in fns.items():
                        t = time.perf_counter()
                        fn(x)
                        times[k].append(time.perf_counter() - t)
                ms = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
                print(f"{shape:>11} {M:>5} {ms['bf16']:8.3f} {ms['dp']:8.3f} {ms['dense']:8.3f} "
                      f"{ms['bf16'] / ms['dp']:9.2f} {ms['bf16'] / ms['dense']:10.2f}  "
                      f"{'dp' if ms['dp'] < ms['dense'] else 'dense'}"
                      + "".join(f"  c{c} x bf16 {ms['bf16'] / ms[f'c{c}']:.2f}" for c in chunks),
                      flush=True)


def chunked(qb, sb, N: int, K: int, nc: int, group: int = 64):
    """The dense path in chunks of ``nc`` channels (a multiple of the kernel's 16-channel
    blocks): each chunk dequantized into a cache-sized buffer and multiplied on its own."""
    lib, _ = cpu_native.load_library()
    dt, threads = cpu_native._DT[torch.bfloat16], torch.get_num_threads()
    buf = torch.empty(nc, K, dtype=torch.bfloat16)
    q_step, s_step = K // 2 * nc, K // group * 2 * nc * 4  # bytes per chunk (blocks of 16)

    def run(x):
        y = torch.empty(x.shape[0], N, dtype=torch.bfloat16)
        for i, n0 in enumerate(range(0, N, nc)):
            c = min(nc, N - n0)
            rc = lib.int4_dequant(qb.data_ptr() + i * q_step, sb.data_ptr() + i * s_step, c, K,
                                  group, buf.data_ptr(), dt, threads)
            assert rc == 0, rc
            y[:, n0:n0 + c] = torch.mm(x, buf[:c].t())
        return y
    return run


if __name__ == "__main__":
    main()
