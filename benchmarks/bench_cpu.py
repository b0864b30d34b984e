"""CPU int4 linear: our backends, torch's int4 op and vLLM's own CPU int4 kernel vs bf16 F.linear.

Usage: python benchmarks/bench_cpu.py [--preset smollm2|1b|8b | --shapes 576x1536,1536x576]
                                      [--group 64] [--ms 1,2,4,...] [--reps 9] [--zero int|none]
                                      [--dtype bfloat16|float16|float32]

Prints median milliseconds per call and ratios taken in this one run. Columns:

* ``bf16``: ``F.linear`` with a dense weight in the activation dtype (``--dtype``, default bf16).
* ``dense``: vLLM's own dense CPU linear, what vLLM-CPU runs for an unquantized layer: oneDNN
  with the weight prepacked once (``ops.create_onednn_mm`` / ``ops.onednn_mm``); faster than
  ``F.linear`` at small M, which packs the weight on every call.
* ``ours``: our int4 linear as the plugin's selector dispatches it on this machine
  (``select_kernel(spec)``, e.g. ``cpu_native``; ``VLLM_INT4XPU_BACKEND`` forces one), through
  its kernel class: ``prepare`` once, then ``apply``. The header names the backend.
* ``cpu``: ``CpuKernel(spec).apply`` (backend ``cpu``); ``op``: torch's int4 op
  ``aten._weight_int4pack_mm_for_cpu`` on a weight packed here (that backend's small-M path).
* ``vllm16``: the anchor -- vLLM's own CPU W4A16 kernel (``CPUWNA16LinearKernel``:
  ``ops.cpu_gemm_wna16``), weights repacked by that kernel's own ``process_weights_after_loading``.
* ``vllm8``: the same vLLM kernel's W4A8 path (``ops.int4_scaled_mm_cpu``, int8 activations),
  which vLLM-CPU takes for bf16 on AMX CPUs unless ``VLLM_CPU_INT4_W4A8=0``.

vLLM is imported only for the three vLLM columns; without it they read n/a. ``x bf16``,
``x dns``, ``x v16``, ``x v8``, ``x cpu``: speed of ours relative to that column (> 1: ours is
faster). Every column of one row is timed round-robin (one call each, ``--reps`` times; the
median per column), so that a machine whose speed drifts within seconds (shared VMs) moves them
together. ``err`` columns
are the relative error against the float64 reference (``reference_linear``), for M <=
--err-max-m.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.nn.functional as F

from vllm_int4xpu.kernels.base import Int4LinearSpec
from vllm_int4xpu.kernels.cpu import CpuKernel, _enable_amx
from vllm_int4xpu.kernels.selector import select_kernel
from vllm_int4xpu.weight import Int4Weight, ZeroKind, dequantize, quantize_rtn, reference_linear

PRESETS = {  # K x N of each linear layer kind (q/o, k/v, gate/up, down)
    "smollm2": "576x576,576x192,576x1536,1536x576",
    "1b": "2048x2048,2048x256,2048x5632,5632x2048",
    "8b": "4096x4096,4096x1024,4096x14336,14336x4096",
}
DEFAULT_SHAPES = "576x1536,1536x576,2048x8192"
DEFAULT_MS = "1,2,4,8,16,32,64,128,384,1024"


def median_ms_interleaved(fns: dict, reps: int) -> dict:
    """Median ms per call of each fn, timed round-robin (one call of each per round)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}


def vllm_dense(w: torch.Tensor):
    """vLLM-CPU's unquantized linear on this weight (oneDNN, prepacked), or why not."""
    try:
        from vllm import _custom_ops as ops
        handler = ops.create_onednn_mm(w.t(), 32)
    except Exception as e:  # no vLLM, or a build without oneDNN
        return f"vLLM's oneDNN linear unavailable ({type(e).__name__})"
    return lambda x: ops.onednn_mm(handler, x, None)


# ------------------------------------------------------------------------- torch's int4 op
@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def vllm_cpu_wna16(w: Int4Weight, act_dtype: torch.dtype = torch.bfloat16, w4a8: bool = False):
    """vLLM's CPU int4 linear kernel prepared from our canonical weight.

    Builds the GPTQ-layout layer that vLLM's loaders hand to ``CPUWNA16LinearKernel`` (qweight
    int32 [K/8, N] packed along K; scales [G, N]; integer zero points int32 [G, N/8] packed along
    N, packed with vLLM's own ``pack_quantized_values_into_int32``; none for symmetric
    weights, type uint4b8) and lets the kernel's own ``process_weights_after_loading`` repack it.
    Returns ``fn(x) -> y`` calling the kernel's op directly (``ops.cpu_gemm_wna16``, or
    ``ops.int4_scaled_mm_cpu`` with ``w4a8``), or a string saying why it is not available.
    """
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
        from vllm.model_executor.layers.quantization.utils.quant_utils import (
            pack_quantized_values_into_int32)
        from vllm.scalar_type import scalar_types
    except Exception as e:  # no vLLM (or another build of it): the columns say n/a
        return f"vLLM not importable ({type(e).__name__})"
    if w.g_idx is not None or w.zero_kind == ZeroKind.FLOAT:
        return "act-order / float zero points: not a vLLM CPU W4A16 layout"
    if act_dtype not in (torch.bfloat16, torch.float16):
        return f"vLLM's CPU int4 kernel takes bf16/fp16 activations, not {act_dtype}"
    _enable_amx()  # a thread must ask for the AMX state before its first AMX instruction
    K, N, g = w.in_features, w.out_features, w.group_size
    sym = w.zero_kind == ZeroKind.NONE
    wtype = scalar_types.uint4b8 if sym else scalar_types.uint4
    cfg = MPLinearLayerConfig(full_weight_shape=(K, N), partition_weight_shape=(K, N),
                              weight_type=wtype, act_type=act_dtype,
                              group_size=-1 if g == K else g, zero_points=not sym)
    ok, why = CPUWNA16LinearKernel.can_implement(cfg)
    if not ok:
        return why
    kernel = CPUWNA16LinearKernel(cfg, w_q_param_name="weight_packed",
                                  w_s_param_name="weight_scale", w_zp_param_name="weight_zero_point")

    def param(t, **dims):  # the dims vLLM's parameter classes carry (GPTQ layout: K first)
        p = torch.nn.Parameter(t.contiguous(), requires_grad=False)
        for k, v in dims.items():
            setattr(p, k, v)
        return p

    layer = torch.nn.Module()
    layer.register_parameter("weight_packed", param(w.qweight.t(), input_dim=0, output_dim=1, packed_dim=0))
    layer.register_parameter("weight_scale", param(w.scales.to(act_dtype), input_dim=0, output_dim=1))
    if sym:
        layer.weight_zero_point = None
    else:
        zp = pack_quantized_values_into_int32(w.zeros.to(torch.int32), wtype, packed_dim=1)
        layer.register_parameter("weight_zero_point", param(zp, input_dim=0, output_dim=1, packed_dim=1))
    layer.bias = None
    with _env("VLLM_CPU_INT4_W4A8", "1" if w4a8 else "0"):
        kernel.process_weights_after_loading(layer)
    if bool(layer.use_w4a8) != w4a8:
        return "vLLM does not take its W4A8 path here (needs AMX and bf16)"
    w_q, w_s, w_zp = kernel._get_weight_params(layer)
    if w4a8:
        return lambda x: ops.int4_scaled_mm_cpu(x=x, w=w_q, w_zeros=w_zp, w_scales=w_s, bias=None)
    isa = layer.isa_hint
    return lambda x: ops.cpu_gemm_wna16(input=x, q_weight=w_q, scales=w_s, zeros=w_zp, bias=None,
                                        pack_factor=8, isa_hint=isa)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def verify_vllm_anchor(K: int, N: int, group: int, dtype=torch.bfloat16) -> bool:
    """Check the vLLM columns against reference_linear for symmetric and integer-zero weights."""
    ok = True
    for kind in (ZeroKind.NONE, ZeroKind.INT):
        w = quantize_rtn(torch.randn(N, K), group, kind)
        for w4a8, limit in ((False, 2e-2), (True, 5e-2)):
            fn = vllm_cpu_wna16(w, dtype, w4a8)
            label = f"vllm{'8' if w4a8 else '16'} zero={kind.value}"
            if isinstance(fn, str):
                print(f"check {label}: n/a ({fn})")
                continue
            errs = []
            for M in (1, 16, 33):
                x = torch.randn(M, K, dtype=dtype)
                errs.append(rel_err(fn(x), reference_linear(x, w)))
            good = max(errs) <= limit
            ok &= good
            print(f"check {label} {K}x{N} g{group}: rel err vs reference_linear "
                  f"{' '.join(f'{e:.1e}' for e in errs)} (M=1,16,33) {'ok' if good else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------- ours
def fmt(v, spec="9.3f", width=9) -> str:
    return f"{v:{spec}}" if isinstance(v, float) else f"{v:>{width}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="shapes of one model (K x N)")
    ap.add_argument("--shapes", help=f"KxN list (default {DEFAULT_SHAPES})")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--ms", default=DEFAULT_MS)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--zero", choices=["int", "none"], default="int",
                    help="zero points of the timed weights: integer (asym) or none (sym)")
    ap.add_argument("--err-max-m", type=int, default=64, help="compute err columns up to this M")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="activation dtype (the dense column is F.linear in this dtype)")
    args = ap.parse_args()
    shapes = args.shapes or PRESETS.get(args.preset) or DEFAULT_SHAPES
    torch.manual_seed(0)
    dt = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, group {args.group}, "
          f"{args.dtype}, zero points {args.zero}, shapes {shapes}")
    K0, N0 = map(int, shapes.split(",")[0].split("x"))
    if not verify_vllm_anchor(K0, N0, args.group, dt):
        raise SystemExit("vLLM anchor disagrees with reference_linear")
    cols = ["bf16", "dense", "ours", "cpu", "op", "vllm16", "vllm8"]
    err_cols = ("ours", "cpu", "vllm16", "vllm8")
    for shape in shapes.split(","):
        K, N = map(int, shape.split("x"))
        w = quantize_rtn(torch.randn(N, K), args.group, args.zero)
        spec = Int4LinearSpec.of(w, dt, "cpu")
        ours_cls = select_kernel(spec)
        ours = ours_cls(spec)
        ours_t = [ours.prepare(w)[n] for n in ours_cls.tensor_names]
        if shape == shapes.split(",")[0]:
            print(f"ours = backend {ours_cls.name!r} ({ours_cls.__module__}.{ours_cls.__name__})")
            print(f"{'K x N':>12} {'M':>5} " + " ".join(f"{c + ' ms':>9}" for c in cols)
                  + f" {'x bf16':>9} {'x dns':>9} {'x v16':>9} {'x v8':>9} {'x cpu':>9}"
                  + " " + " ".join(f"{'err ' + c.replace('vllm', 'v'):>9}" for c in err_cols))
        kern, prepared = None, {}
        if CpuKernel.can_implement(spec)[0]:
            kern = CpuKernel(spec)
            prepared = kern.prepare(w)
            tensors = [prepared[n] for n in CpuKernel.tensor_names]
        # torch's op on the cpu backend's own packing (same limits)
        packed, scale_zero = (prepared["packed"], prepared["scale_zero"]) if kern else (None, None)
        wd = torch.randn(N, K, dtype=dt)
        paths = {
            "bf16": lambda x: F.linear(x, wd),
            "dense": vllm_dense(wd),
            "ours": lambda x: ours.apply(ours_t, x),
            "cpu": (lambda x: kern.apply(tensors, x)) if kern else None,
            "op": (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, args.group, scale_zero))
            if kern else None,
            "vllm16": vllm_cpu_wna16(w, dt, w4a8=False),
            "vllm8": vllm_cpu_wna16(w, dt, w4a8=True),
        }
        paths = {k: (v if callable(v) else None) for k, v in paths.items()}
        w64 = None
        for M in map(int, args.ms.split(",")):
            x = torch.randn(M, K, dtype=dt)
            ms = {c: "n/a" for c in cols}
            ms.update(median_ms_interleaved(
                {c: (lambda fn=fn: fn(x)) for c, fn in paths.items() if fn}, args.reps))
            errs = {}
            if M <= args.err_max_m:
                if w64 is None:
                    w64 = dequantize(w, torch.float64)
                ref = x.double() @ w64.t()
                errs = {c: rel_err(paths[c](x), ref) for c in err_cols if paths[c]}

            def ratio(a, b):  # speed of a relative to b (> 1: a is faster)
                return ms[b] / ms[a] if isinstance(ms[a], float) and isinstance(ms[b], float) else "n/a"

            print(f"{shape:>12} {M:>5} " + " ".join(fmt(ms[c]) for c in cols)
                  + " " + " ".join(fmt(ratio(a, b), "9.2f") for a, b in
                                   (("ours", "bf16"), ("ours", "dense"), ("ours", "vllm16"),
                                    ("ours", "vllm8"), ("ours", "cpu")))
                  + " " + " ".join(fmt(errs.get(c, "-"), "9.1e") for c in err_cols),
                  flush=True)


if __name__ == "__main__":
    main()
