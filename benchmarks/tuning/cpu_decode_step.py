"""Host cost of the cpu_native kernel's call paths over one decode step of SmolLM2's int4 linears
(30 layers x qkv, o, gate_up, down; group 64, bf16, integer zero points).

    .venv/bin/python benchmarks/tuning/cpu_decode_step.py [--ms 1,4] [--rounds 40]

Three ways to run the same 120 calls, timed round-robin (one step of each per round, median and
min over rounds): ``raw`` (the kernel's C function through ctypes into preallocated outputs:
the kernel alone), ``int4xpu::linear`` (the Python op, as vLLM layers called it before the C++
op) and ``cpu_native_mm`` (the C++ op ``int4xpu::cpu_native_mm`` vLLM layers call now).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vllm_int4xpu.kernels.base import Int4LinearSpec
from vllm_int4xpu.kernels.cpu_native import CpuNativeKernel, load_library
from vllm_int4xpu.kernels.ops import int4_linear
from vllm_int4xpu.weight import ZeroKind, quantize_rtn

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30  # K x N, SmolLM2-135M


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    lib, why = load_library()
    assert lib is not None, why
    layers = []
    for K, N in SHAPES:
        w = quantize_rtn(torch.randn(N, K) * 0.05, 64, ZeroKind.INT)
        spec = Int4LinearSpec.of(w, torch.bfloat16, "cpu")
        kern = CpuNativeKernel(spec)
        prepared = kern.prepare(w)
        op_args = kern.op_args()
        assert op_args is not None, "the C++ op is unavailable (see the log)"
        layers.append((K, N, spec, [prepared[n] for n in kern.tensor_names], op_args))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(layers)} linears")
    for M in (int(m) for m in args.ms.split(",")):
        xs = {K: torch.randn(M, K, dtype=torch.bfloat16) for K, _ in SHAPES[:4]}
        ys = {N: torch.empty(M, N, dtype=torch.bfloat16) for _, N in SHAPES[:4]}

        def raw():
            for K, N, _, t, _ in layers:
                lib.int4_gemm(xs[K].data_ptr(), 1, M, K, t[0].data_ptr(), t[1].data_ptr(), N, 64,
                              ys[N].data_ptr(), 1, 0, 64, 2, torch.get_num_threads())

        def python_op():
            for K, _, spec, t, _ in layers:
                int4_linear(xs[K], t, "cpu_native", spec)

        def cpp_op():
            for K, _, spec, t, op_args in layers:
                int4_linear(xs[K], t, "cpu_native", spec, None, op_args)

        fns = {"raw": raw, "int4xpu::linear": python_op, "cpu_native_mm": cpp_op}
        for f in fns.values():
            for _ in range(5):
                f()
        times = {n: [] for n in fns}
        for _ in range(args.rounds):
            for n, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[n].append((time.perf_counter() - t0) * 1e3)
        print(f"M={M}: " + "  ".join(f"{n} {statistics.median(v):.2f} ms (min {min(v):.2f})"
                                     for n, v in times.items()))


if __name__ == "__main__":
    main()
