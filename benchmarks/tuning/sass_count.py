"""Count the SASS instructions of a Triton int4 kernel's main loop, on a machine with no GPU.

Triton compiles for sm_90 offline (its wheel ships ptxas and nvdisasm), so the instruction cost
of a kernel change can be read before any GPU time is spent, and two variants can be checked for
compiling to the same SASS. The current kernels are latency-bound on the H100/H200, not
issue-bound (BENCHMARKS.md), so fewer instructions alone do not predict a faster kernel.

    python benchmarks/tuning/sass_count.py gemv --block-n 128 --block-k 128 --num-warps 4 --m 1
    python benchmarks/tuning/sass_count.py gemv --block-n 64 --block-k 128 --num-warps 1 --rows 2 --stages 3
    python benchmarks/tuning/sass_count.py gemm --block-m 16 --block-n 64 --block-k 128 --frag 2
    python benchmarks/tuning/sass_count.py moe_dot --gated --block-m 128 --block-n 64 --block-k 128 --frag 2 [--x-frag]
    python benchmarks/tuning/sass_count.py moe_gemv --gated --block-n 16 --block-k 1024 --gpt 8

Prints the loop body's instruction histogram and instructions per weight per thread.
Use the Triton version of the target machine for numbers that match it (e.g. PYTHONPATH to a
``pip install --target`` of triton==3.6.0): code generation differs between releases.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_int4xpu.kernels.triton_kernels import fused_moe, gemm, gemv  # noqa: E402

POINTERS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16",
            "bias_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
_OP = re.compile(r"^\S*\t(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


# Integer arguments that the JIT sees as multiples of 16 on the benchmark shapes (it specializes
# those, and 16-byte-aligned pointers, as "divisible by 16"; without the hint no load vectorizes).
DIVISIBLE = ("N", "K", "GROUP", "stride_xm", "stride_ym", "stride_qn", "one_bits",
             "stride_am", "stride_qe", "stride_se", "stride_pe")
MOE_POINTERS = {"a_ptr": "*bf16", "perm_ptr": "*i32", "out_ptr": "*bf16", "sorted_ptr": "*i32",
                "block_expert_ptr": "*i32", "npad_ptr": "*i32", "topw_ptr": "*fp32",
                "ids_ptr": "*i32", "order_ptr": "*i32"}


def compile_sm90(fn, constexprs: dict, num_warps: int, num_stages: int):
    names = fn.arg_names
    sig = {n: POINTERS.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if (n in POINTERS or n in DIVISIBLE) and n not in constexprs}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_registers(ptx: str) -> str:
    """'N registers, S bytes spilled' from Triton's bundled ptxas -v (empty if it cannot run)."""
    import subprocess
    import tempfile
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        try:
            r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o",
                                str(Path(d) / "k.cubin")], capture_output=True, text=True,
                               timeout=120)
        except (OSError, subprocess.SubprocessError):
            return ""
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return f"{regs.group(1)} registers, {spill.group(1) if spill else '?'} bytes spilled" if regs else ""


def loop_histogram(sass: str) -> collections.Counter:
    """Opcode counts of the block that ends in a backward branch to its own label (the K loop)."""
    lines = sass.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"BRA `?\(?\.?(LBB\w+)", line)
        if not m:
            continue
        start = next((j for j, x in enumerate(lines) if x.strip() == m.group(1) + ":"), None)
        if start is not None and start < i:
            ops = [mm.group(2).split(".")[0] for x in lines[start:i + 1] if (mm := _OP.match(x))]
            if len(ops) > 1:
                return collections.Counter(ops)
    return collections.Counter()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("kernel", choices=["gemv", "gemm", "moe_dot", "moe_gemv"])
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--split-k", type=int, default=4)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=3)
    ap.add_argument("--group-shift", type=int, default=7, help="log2(group); -1: non-power-of-2")
    ap.add_argument("--zero-kind", type=int, default=2, help="0 none, 1 int, 2 float")
    ap.add_argument("--stages", type=int, default=1,
                    help="gemv: 1 = register double buffering, >= 2 = the compiler's pipeline")
    ap.add_argument("--rows", type=int, default=1, help="gemv: rows of x per program (1, 2, 4)")
    ap.add_argument("--frag", type=int, default=0, choices=(0, 1, 2),
                    help="gemm: 0 = interleaving unpack + shared-memory move, 1 = fragment order, "
                         "2 = fragment order with packed bf16 pairs (inline PTX)")
    ap.add_argument("--persist", type=int, default=0, choices=(0, 1),
                    help="gemm: 1 = persistent grid walking the tiles")
    ap.add_argument("--unroll", type=int, default=None, help="gemm: loop_unroll_factor")
    ap.add_argument("--pdl", action="store_true", help="programmatic dependent launch waits")
    ap.add_argument("--gated", action="store_true", help="moe_*: the gate_up GEMM (two tiles)")
    ap.add_argument("--x-frag", action="store_true",
                    help="moe_dot: A's columns already in fragment order (XPERM)")
    ap.add_argument("--gpt", type=int, default=1, help="moe_gemv: groups per K tile")
    ap.add_argument("--dump", default=None, help="write the SASS to this file")
    ap.add_argument("--prefetch", action="store_true",
                    help="moe_gemv (down): first weight tile fetched before the PDL wait")
    ap.add_argument("--m", type=int, default=0,
                    help="M as the JIT specializes it (1 becomes a constant); 0: runtime")
    a = ap.parse_args()
    common = dict(ZERO_KIND=a.zero_kind, HAS_BIAS=False, SPLIT_K=a.split_k, BLOCK_N=a.block_n,
                  BLOCK_K=a.block_k, EVEN_K=True, GROUP_SHIFT=a.group_shift, SERIAL=True,
                  PDL=a.pdl)
    if a.m == 1:
        common["M"] = 1
    moe = dict(A_DIV=1, GATED=a.gated, ACT=0, ZERO_KIND=a.zero_kind, HAS_PERM=False,
               SPLIT_K=1 if a.gated else a.split_k, BLOCK_N=a.block_n, BLOCK_K=a.block_k,
               EVEN_K=True, GROUP_SHIFT=a.group_shift, GROUP_M=1, PDL=a.pdl)
    if a.kernel.startswith("moe"):
        POINTERS.update(MOE_POINTERS)
        POINTERS["out_ptr"] = "*bf16" if a.gated or a.kernel == "moe_dot" else "*fp32"
    if a.kernel == "moe_dot":
        fn, cex = fused_moe.moe_dot_kernel, dict(moe, BLOCK_M=a.block_m, FRAG=a.frag,
                                                 NUM_WARPS=a.num_warps, USE_ASM=a.frag == 2,
                                                 IEEE=False, X_FRAG=a.x_frag, OUT_BK=0,
                                                 OUT_PACKED=False)
        weights = a.block_n * a.block_k * (2 if a.gated else 1)
    elif a.kernel == "moe_gemv":
        fn, cex = fused_moe.moe_gemv_kernel, dict(moe, SORTED=False, SERIAL=not a.gated,
                                                  TOP_K=8, GPT=a.gpt, PDL_EARLY=False,
                                                  PREFETCH=a.prefetch and not a.gated)
        weights = a.block_n * a.block_k * (2 if a.gated else 1)
    elif a.kernel == "gemv":
        fn, cex = gemv.int4_gemv_kernel, dict(common, EVEN_N=True, X_PAIRS=1, ROWS=a.rows,
                                              K_FASTEST=True,
                                              STAGES=a.stages)
        POINTERS["x_ptr"] = "*i32"  # bf16 activations read as int32 pairs
        weights = a.block_n * a.block_k
    else:
        fn, cex = gemm.int4_gemm_kernel, dict(common, BLOCK_M=a.block_m, GATHER=False,
                                              K_FASTEST=False, IEEE=False, FRAG=a.frag,
                                              NUM_WARPS=a.num_warps, USE_ASM=a.frag == 2,
                                              PERSIST=a.persist, UNROLL=a.unroll)
        weights = a.block_n * a.block_k
    ck = compile_sm90(fn, cex, a.num_warps, a.num_stages)
    hist = loop_histogram(ck.asm["sass"])
    n_all = sum(1 for x in ck.asm["sass"].splitlines() if _OP.match(x))
    total = sum(hist.values())
    per_thread = weights / (32 * a.num_warps)
    print(f"{a.kernel} {cex} num_warps={a.num_warps}  triton {triton.__version__}")
    rows = {"gemv": a.rows, "moe_gemv": 1}.get(a.kernel, a.block_m)
    print(f"loop body: {total} instructions per thread per K tile; {per_thread:.0f} weights per "
          f"thread per tile -> {total / per_thread:.2f} instructions per weight "
          f"({total / per_thread / rows:.2f} per weight and row of x, {rows} rows)")
    print("  " + ", ".join(f"{op} {n}" for op, n in hist.most_common(24)))
    print(f"whole kernel: {n_all} instructions; {ptxas_registers(ck.asm['ptx'])}")
    if a.pdl:
        print("griddepcontrol in PTX:", ck.asm["ptx"].count("griddepcontrol"))
        if a.dump:
            Path(a.dump).write_text(ck.asm["sass"])


if __name__ == "__main__":
    main()
