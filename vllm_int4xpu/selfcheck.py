"""``python -m vllm_int4xpu.selfcheck``: run every kernel backend here against the float64 reference.

For the chosen device it walks all registered backends (``kernels.selector.BACKENDS``), skips the
ones that refuse (printing why), and runs the others on random weights: group sizes 32, 64, 128 and
per-channel; symmetric, integer and float zero points; act-order; several batch sizes. Each output
is compared with :func:`vllm_int4xpu.weight.reference_linear` in float64. The fused-MoE backends
(``kernels.selector.MOE_BACKENDS``, rows ``moe:<name>``) run random int4 experts (both zero-point
kinds, act-order, top-k 1/2/8, experts that receive no token) against
:func:`vllm_int4xpu.weight.reference_moe` in float64. It then times one
decode-sized layer per backend and reports the weight bytes streamed per second (GB/s) next to a
bf16 ``F.linear`` of the same shape. Exit status 1 on any mismatch or error.

Imports no vLLM: it runs on a plain torch install (CPU, CUDA or XPU). ``--quick`` (CI) takes
seconds on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .weight import Int4Weight, ZeroKind, quantize_rtn, reference_linear

# Relative error (||y - ref|| / ||ref||) allowed per activation dtype: a few roundings of the dtype
# (outputs and, for dequantizing backends, weights), far below what a wrong group, zero point or
# permutation produces (> 0.1 on random data).
TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-3}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Case:
    K: int
    N: int
    group: int  # -1: per-channel
    zero_kind: ZeroKind
    act_order: bool
    M: int
    dtype: torch.dtype = torch.bfloat16

    def label(self) -> str:
        g = "chan" if self.group == -1 else str(self.group)
        return (f"K={self.K} N={self.N} g={g} zp={self.zero_kind.value}"
                f"{' act' if self.act_order else ''} M={self.M} "
                f"{str(self.dtype).replace('torch.', '')}")


@dataclass
class Result:
    backend: str
    case: Optional[Case]
    status: str  # PASS | FAIL | SKIP
    rel_err: Optional[float] = None
    note: str = ""


def make_cases(quick: bool) -> list[Case]:
    groups = (32, 64, 128, -1)
    kinds = (ZeroKind.NONE, ZeroKind.INT, ZeroKind.FLOAT)
    shapes = [(256, 128)] if quick else [(256, 128), (1024, 384), (4096, 1024)]
    ms = (1, 7) if quick else (1, 5, 64)
    cases = []
    for si, (K, N) in enumerate(shapes):
        for gi, g in enumerate(groups):
            for zi, z in enumerate(kinds):
                cases.append(Case(K, N, g, z, False, ms[(si + gi + zi) % len(ms)]))
        # act-order (desc_act): one integer-zp and one float-zp layer per shape
        cases.append(Case(K, N, 64, ZeroKind.INT, True, ms[si % len(ms)]))
        cases.append(Case(K, N, 128, ZeroKind.FLOAT, True, ms[(si + 1) % len(ms)]))
    for z in kinds:  # float16 activations
        cases.append(Case(256, 128, 128, z, z == ZeroKind.INT, 3, torch.float16))
    if not quick:
        cases.append(Case(1024, 384, 128, ZeroKind.INT, False, 4, torch.float32))
    return cases


@dataclass(frozen=True)
class MoECase:
    E: int
    H: int
    I: int
    group: int
    zero_kind: ZeroKind
    act_order: bool
    top_k: int
    M: int
    dtype: torch.dtype = torch.bfloat16

    def label(self) -> str:
        return (f"E={self.E} H={self.H} I={self.I} g={self.group} zp={self.zero_kind.value}"
                f"{' act' if self.act_order else ''} k={self.top_k} M={self.M} "
                f"{str(self.dtype).replace('torch.', '')}")


def make_moe_cases(quick: bool) -> list[MoECase]:
    cases = [MoECase(8, 256, 128, 64, ZeroKind.INT, False, 2, 5),
             MoECase(8, 256, 128, 32, ZeroKind.FLOAT, False, 1, 3),
             MoECase(16, 256, 128, 128, ZeroKind.NONE, False, 8, 4),
             MoECase(8, 256, 128, 64, ZeroKind.INT, True, 2, 9, torch.float16)]
    if not quick:
        cases += [MoECase(16, 1024, 384, 128, ZeroKind.FLOAT, False, 8, 64),
                  MoECase(8, 1024, 512, 64, ZeroKind.INT, True, 2, 200)]
    return cases


def make_experts(E: int, N: int, K: int, case: MoECase, gen: torch.Generator):
    from .weight import Int4Experts
    return Int4Experts.stack([make_weight(Case(K, N, case.group, case.zero_kind, case.act_order,
                                               1, case.dtype), gen) for _ in range(E)])


def run_moe_accuracy(dev: str, cases: list[MoECase], seed: int,
                     only: Optional[list[str]]) -> tuple[list[Result], list[str]]:
    """Every MoE backend on random int4 experts vs float64 ``reference_moe``; rows ``moe:<name>``."""
    from .kernels import Int4MoE, Int4MoESpec, check_backend
    from .kernels.selector import MOE_BACKENDS, MOE_ORDER
    from .weight import reference_moe

    names = list(MOE_ORDER.get(dev, ())) + [n for n in MOE_BACKENDS if n not in MOE_ORDER.get(dev, ())]
    if only:
        names = [n for n in names if n in only]
    results = []
    for ci, case in enumerate(cases):
        gen = torch.Generator().manual_seed(seed + 1000 + ci)
        w13 = make_experts(case.E, 2 * case.I, case.H, case, gen)
        w2 = make_experts(case.E, case.H, case.I, case, gen)
        x = torch.randn(case.M, case.H, generator=gen).to(case.dtype)
        # the last expert receives no token
        ids = torch.stack([torch.randperm(case.E - 1, generator=gen)[:case.top_k]
                           for _ in range(case.M)])
        tw = torch.rand(case.M, case.top_k, generator=gen)
        tw = tw / tw.sum(-1, keepdim=True)
        ref = reference_moe(x, w13, w2, tw, ids)
        spec = Int4MoESpec.of(w13, w2, case.dtype, dev)
        for name in names:
            ok, why = check_backend(name, spec, moe=True)
            if not ok:
                results.append(Result(f"moe:{name}", case, "SKIP", note=why))
                continue
            try:
                moe = Int4MoE(w13.to_device(dev), w2.to_device(dev), case.dtype, dev, backend=name)
                y = moe(x.to(dev), tw.to(dev), ids.to(dev))
                synchronize(dev)
                good, err = compare(y, ref, case.dtype)
                results.append(Result(f"moe:{name}", case, "PASS" if good else "FAIL", err,
                                      "" if good else f"tolerance {TOLERANCE[case.dtype]:g}"))
            except Exception as e:  # a crash is a failure of that backend, not of the check
                results.append(Result(f"moe:{name}", case, "FAIL", None,
                                      f"{type(e).__name__}: {e}"[:160]))
    return results, [f"moe:{n}" for n in names]


def make_weight(case: Case, gen: torch.Generator) -> Int4Weight:
    dense = torch.randn(case.N, case.K, generator=gen)
    w = quantize_rtn(dense, case.group, case.zero_kind, scale_dtype=case.dtype)
    if case.act_order:
        g = w.group_size
        w.g_idx = (torch.randperm(case.K, generator=gen) // g).to(torch.int32)
    return w


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64 (inf when y has NaN/inf or the wrong shape)."""
    if tuple(y.shape) != tuple(ref.shape):
        return float("inf")
    y64 = y.detach().to("cpu", torch.float64)
    if not torch.isfinite(y64).all():
        return float("inf")
    return float((y64 - ref).norm() / ref.norm().clamp_min(1e-30))


def compare(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    err = relative_error(y, ref)
    return err <= TOLERANCE[dtype], err


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def device_available(dev: str) -> bool:
    if dev == "cpu":
        return True
    if dev == "cuda":
        return torch.cuda.is_available()
    if dev == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return False


def synchronize(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()
    elif dev == "xpu":
        torch.xpu.synchronize()


def best_time(fn, dev: str, rounds: int, min_sample_s: float = 2e-3) -> float:
    """Best-of-``rounds`` seconds per call (min: shared machines only ever add time)."""
    fn()
    synchronize(dev)
    t0 = time.perf_counter()
    fn()
    synchronize(dev)
    reps = max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        synchronize(dev)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


L2_DEFEAT_BYTES = 256 << 20  # graph timing cycles through >= this many weight bytes


def graph_time(fns, dev: str, rounds: int) -> Optional[float]:
    """Seconds per call when one CUDA graph holding one call of each of ``fns`` (each on its own
    copy of the weight, so the L2 cannot hold them all) is replayed: how vLLM runs decode, with
    no Python launch cost. None off CUDA or where the calls cannot be captured."""
    if not dev.startswith("cuda"):
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in fns:  # warm-up outside capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
    except Exception:  # noqa: BLE001  (the eager column still reports the backend)
        return None
    return best_time(graph.replay, dev, rounds) / len(fns)


def copies_for(nbytes: int) -> int:
    """Weight copies a graph cycles through so that they exceed the L2 (2..64)."""
    return max(2, min(64, -(-L2_DEFEAT_BYTES // nbytes)))


def backend_names(dev: str, only: Optional[list[str]]) -> list[str]:
    from .kernels.selector import BACKENDS, MOE_BACKENDS, ORDER

    names = list(ORDER.get(dev, ())) + [n for n in BACKENDS if n not in ORDER.get(dev, ())]
    names = [n for n in names if n in BACKENDS]
    if only:
        unknown = [n for n in only if n not in BACKENDS]
        unknown = [n for n in unknown if n not in MOE_BACKENDS]
        if unknown:
            raise SystemExit(f"selfcheck: unknown backend(s) {unknown}; known: {sorted(BACKENDS)}")
        names = [n for n in names if n in only]
    return names


def run_accuracy(names: list[str], dev: str, cases: list[Case], seed: int) -> list[Result]:
    from .kernels import Int4Linear, Int4LinearSpec, check_backend

    results = []
    for ci, case in enumerate(cases):
        gen = torch.Generator().manual_seed(seed + ci)
        w = make_weight(case, gen)
        x = torch.randn(case.M, case.K, generator=gen).to(case.dtype)
        bias = torch.randn(case.N, generator=gen).to(case.dtype) if ci % 2 else None
        ref = reference_linear(x, w, bias)
        spec = Int4LinearSpec.of(w, case.dtype, dev)
        for name in names:
            ok, why = check_backend(name, spec)
            if not ok:
                results.append(Result(name, case, "SKIP", note=why))
                continue
            try:
                layer = Int4Linear(w.to(dev), case.dtype, dev, backend=name)
                y = layer(x.to(dev), None if bias is None else bias.to(dev))
                synchronize(dev)
                good, err = compare(y, ref, case.dtype)
                results.append(Result(name, case, "PASS" if good else "FAIL", err,
                                      "" if good else f"tolerance {TOLERANCE[case.dtype]:g}"))
            except Exception as e:  # a crash is a failure of that backend, not of the check
                results.append(Result(name, case, "FAIL", None, f"{type(e).__name__}: {e}"[:160]))
    return results


def run_speed(names: list[str], dev: str, quick: bool, seed: int) -> list[str]:
    """One decode-sized layer per backend: weight bytes per second vs bf16 F.linear."""
    from .kernels import Int4Linear, Int4LinearSpec, check_backend

    K, N, M, g = (1024, 1024, 1, 128) if quick else (4096, 4096, 1, 128)
    rounds = 5 if quick else 20
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(N, K, generator=gen)
    w = quantize_rtn(dense, g, ZeroKind.INT, scale_dtype=torch.bfloat16)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16).to(dev)
    w_bf16 = dense.to(torch.bfloat16).to(dev)
    t_bf16 = best_time(lambda: F.linear(x, w_bf16), dev, rounds)
    bf16_bytes = N * K * 2
    g_bf16 = graph_time([lambda w_=w_bf16.clone(): F.linear(x, w_)
                         for _ in range(copies_for(bf16_bytes))], dev, rounds)
    int4_bytes = N * K // 2 + w.scales.numel() * 2 + w.zeros.numel()  # codes + bf16 scales + zp
    lines = [f"speed: K={K} N={N} M={M} g={g} int zp bf16 on {dev}; "
             f"bf16 F.linear {t_bf16 * 1e6:.1f} us = {_gbs(bf16_bytes / t_bf16)} GB/s",
             "  (eager: one Python-launched call at a time, launch cost included"
             + ("; graph: replayed from a CUDA graph as vLLM runs decode, over weight copies"
                " larger than the L2" if g_bf16 else "") + ")",
             f"  {'backend':<18} {'us':>9} {'GB/s':>8} {'speedup vs bf16':>16}"
             + (f" {'graph us':>9} {'vs bf16':>8}" if g_bf16 else "")]
    spec = Int4LinearSpec.of(w, torch.bfloat16, dev)
    for name in names:
        ok, why = check_backend(name, spec)
        if not ok:
            continue
        try:
            layer = Int4Linear(w.to(dev), torch.bfloat16, dev, backend=name)
            t = best_time(lambda: layer(x), dev, rounds)
            # the oracle dequantizes the whole weight per call: its bytes/s says nothing
            gbs = "-" if name == "reference" else _gbs(int4_bytes / t)
            line = f"  {name:<18} {t * 1e6:>9.1f} {gbs:>8} {t_bf16 / t:>15.2f}x"
            if name == "reference":
                line += "  (oracle, not a speed path)"
            tg = None
            if g_bf16 and name != "reference":  # the oracle is not a speed path
                layers = [layer] + [Int4Linear(w.to(dev), torch.bfloat16, dev, backend=name)
                                    for _ in range(copies_for(int4_bytes) - 1)]
                tg = graph_time([lambda l_=l_: l_(x) for l_ in layers], dev, rounds)
            if tg:
                line += f" {tg * 1e6:>9.1f} {g_bf16 / tg:>7.2f}x"
            lines.append(line)
        except Exception as e:
            lines.append(f"  {name:<18} error: {type(e).__name__}: {e}"[:160])
    return lines


def _gbs(bytes_per_s: float) -> str:
    """GB/s with enough digits that a slow path never prints as 0.0."""
    g = bytes_per_s / 1e9
    return f"{g:.1f}" if g >= 10 else f"{g:.3g}"


def print_report(results: list[Result], names: list[str], dev: str) -> None:
    print(f"{'backend':<18} {'case':<50} {'result':<6} {'rel err':>9}  note")
    print("-" * 96)
    for name in names:
        mine = [r for r in results if r.backend == name]
        ran = [r for r in mine if r.status != "SKIP"]
        for r in ran:
            err = "-" if r.rel_err is None else f"{r.rel_err:.2e}"
            print(f"{name:<18} {r.case.label():<50} {r.status:<6} {err:>9}  {r.note}")
        skipped = {}
        for r in mine:
            if r.status == "SKIP":
                skipped.setdefault(r.note, []).append(r)
        for why, rs in skipped.items():
            what = "all cases" if not ran and len(skipped) == 1 else f"{len(rs)} case(s)"
            print(f"{name:<18} {'skipped ' + what:<50} {'SKIP':<6} {'-':>9}  {why}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vllm-int4xpu selfcheck", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every int4 kernel backend available on this device (linear layers and "
                    "fused MoE) against a float64\nreference on random weights, then time one "
                    "decode-sized layer per backend.",
        epilog="Prints one row per backend and case (pass/FAIL, error), a line per refused "
               "backend saying why,\nand the GB/s of weight bytes streamed next to a bf16 "
               "F.linear. Exit status 1 on any mismatch.\n\nexamples:\n"
               "  vllm-int4xpu selfcheck --quick              # seconds on CPU (what CI runs)\n"
               "  vllm-int4xpu selfcheck --device xpu         # first thing to run on an Intel GPU\n"
               "  vllm-int4xpu selfcheck --backends triton,reference --no-speed")
    ap.add_argument("--device", default="auto", choices=["auto", "xpu", "cuda", "cpu"],
                    help="device to check (default auto: xpu, else cuda, else cpu)")
    ap.add_argument("--quick", action="store_true", help="small shapes, a few seconds (CI)")
    ap.add_argument("--backends", default="",
                    help="comma list of backends to run (default: all that can run here)")
    ap.add_argument("--no-speed", action="store_true", help="skip the GB/s measurement")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = ap.parse_args(argv)

    dev = pick_device(args.device)
    if not device_available(dev):
        print(f"selfcheck: device {dev!r} is not available in this torch build "
              f"(torch {torch.__version__})", file=sys.stderr)
        return 2
    names = backend_names(dev, [n for n in args.backends.split(",") if n] or None)
    t0 = time.perf_counter()
    print(f"vllm-int4xpu selfcheck on {dev} (torch {torch.__version__}); "
          f"backends: {', '.join(names)}")
    results = run_accuracy(names, dev, make_cases(args.quick), args.seed)
    moe_results, moe_names = run_moe_accuracy(
        dev, make_moe_cases(args.quick), args.seed, [n for n in args.backends.split(",") if n] or None)
    results += moe_results
    print_report(results, names + moe_names, dev)
    if not args.no_speed:
        for line in run_speed(names, dev, args.quick, args.seed):
            print(line)
    failed = [r for r in results if r.status == "FAIL"]
    passed = [r for r in results if r.status == "PASS"]
    print(f"{len(passed)} passed, {len(failed)} failed, "
          f"{sum(r.status == 'SKIP' for r in results)} skipped in {time.perf_counter() - t0:.1f}s")
    if not passed and not failed:
        print("selfcheck: no backend ran on this device", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
