"""SASS cost of a sketch of an int8 tensor-core K loop for int4 weights, offline (no GPU).

    python benchmarks/tuning/int8_tile_sass.py --block-n 64 --block-k 128 --block-m 16

This is not a kernel of the package and computes nothing that is checked. It is the loop a
future int8 path would run, compiled for sm_90 so that its instructions per weight can be set
against the fp16 dequantization of the dot path (``sass_count.py moe_dot ...``):

* weight nibbles to int8 bytes: ``w & 0x0F0F0F0F`` and ``(w >> 4) & 0x0F0F0F0F`` per int32 word
  (two LOP3 and a shift for 8 weights), so byte j of the pair (h = 0/1) holds nibble 2j + h and
  x would be stored in that k order;
* x as 16-bit fixed point split into two int8 planes (hi, lo), given here pre-split as a
  [2 BLOCK_M, BLOCK_K] int8 tile: the two planes fill token columns of the MMA that small M
  leaves idle;
* ``tl.dot`` int8 x int8 -> int32, exact within a group; per K tile (one group) the two planes
  are combined (256 hi + lo) and rescaled into the fp32 accumulator (BLOCK_K = the group size).

Missing from the sketch, and needed by a real path: the zero point (minus z times the group sum
of x), the per-token or per-tile x scale, and quantizing x (one more launch, or in the loop).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_count import loop_histogram, ptxas_registers  # noqa: E402


@triton.jit
def _bytes(v):
    """int32 [..., 4] holding one word four times -> int8 [..., 4]: byte j of the word."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r,r,r", [v], dtype=tl.int8,
                                     is_pure=True, pack=4)


@triton.jit
def int8_tile_sketch(w_ptr, x_ptr, s_ptr, out_ptr, K, BN: tl.constexpr, BK: tl.constexpr,
                     BM: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_w = tl.arange(0, BK // 8)
    offs_m = tl.arange(0, 2 * BM)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        words = tl.load(w_ptr + offs_n[:, None] * (K // 8) + k0 // 8 + offs_w[None, :])
        both = tl.join(words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F)  # [BN, BK/8, 2]
        w8 = tl.reshape(_bytes(tl.broadcast_to(both[:, :, :, None], [BN, BK // 8, 2, 4])),
                        [BN, BK])
        x = tl.load(x_ptr + offs_m[None, :] * K + k0 + offs_k[:, None])  # [BK, 2 BM] int8
        r_hi, r_lo = tl.split(tl.reshape(tl.dot(w8, x), [BN, BM, 2]))
        s = tl.load(s_ptr + offs_n * (K // BK) + k0 // BK)
        acc += s[:, None] * (r_hi.to(tl.float32) * 256.0 + r_lo.to(tl.float32))
    tl.store(out_ptr + offs_n[:, None] * BM + tl.arange(0, BM)[None, :], acc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--block-m", type=int, default=16, help="tokens (the MMA gets 2x: planes)")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=3)
    a = ap.parse_args()
    cex = dict(BN=a.block_n, BK=a.block_k, BM=a.block_m)
    names = int8_tile_sketch.arg_names
    sig = {"w_ptr": "*i32", "x_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*fp32", "K": "i32",
           **{k: "constexpr" for k in cex}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in cex}
    src = ASTSource(fn=int8_tile_sketch, signature=sig, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in cex.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=a.num_warps, num_stages=a.num_stages))
    hist = loop_histogram(ck.asm["sass"])
    n = sum(hist.values())
    per_thread = a.block_n * a.block_k / (32 * a.num_warps)
    top = ", ".join(f"{op} {c}" for op, c in hist.most_common(12))
    print(f"int8 sketch BN {a.block_n} BK {a.block_k} BM {a.block_m}, {a.num_warps} warps, "
          f"triton {triton.__version__}: loop {n} instructions per thread per K tile, "
          f"{per_thread:.0f} weights per thread -> {n / per_thread:.2f} per weight\n  {top}\n"
          f"  {ptxas_registers(ck.asm['ptx'])}")


if __name__ == "__main__":
    main()
