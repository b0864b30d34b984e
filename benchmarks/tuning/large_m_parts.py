"""Where the time of the large-M path goes (GPU): dequantize + cuBLAS against cuBLAS alone.

    python3 benchmarks/tuning/large_m_parts.py --ms 512,2048
    python3 benchmarks/tuning/large_m_parts.py --ms 2048 --variants '{"BLOCK_N": 32}'

Per shape and M, in one run and with the same CUDA-graph method as bench_kernels.py (replays over
distinct weight copies that defeat the L2), prints the µs of

* ``cublas``       F.linear on a dense bf16 weight (the anchor);
* ``mm_chunks``    the same GEMM as the path issues it: one torch.mm per CHUNK_N rows of the
                   weight into column slices of the output (dense chunks prepared beforehand);
* ``dequant``      only the dequantization, chunk by chunk into the reused buffer;
* ``fill``         a write-only floor for it: ``fill_`` of the same buffer as often (the bf16 bytes
                   the dequantization writes, with nothing read);
* ``path``         the table's dequant row end to end (int4_matmul);

so ``path - cublas`` splits into the dequantization and the cost of chunking the GEMM. With
--variants, each JSON dict of dequantization options replaces the row's own in another line.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_kernels
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_kernels import GROUP, SHAPES, time_graph, tuned_rows  # noqa: E402
from vllm_int4xpu.kernels.triton_backend import int4_matmul  # noqa: E402
from vllm_int4xpu.kernels.triton_kernels import ZERO_FLOAT, int4_dequantize  # noqa: E402


def parts(K, N, M, ws, cfg):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    chunk = cfg.get("CHUNK_N") or N
    spans = [(n0, min(chunk, N - n0)) for n0 in range(0, N, chunk)]  # (first row, rows)
    dq = {k: v for k, v in cfg.items() if k != "CHUNK_N"}
    # make_weights' copies have float zero points
    dense = [int4_dequantize(w.qweight, w.scales, w.zeros, ZERO_FLOAT, GROUP, torch.bfloat16, K,
                             **dq)
             for w in ws[:2]]  # two dense copies: the weight is re-read from DRAM each call
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    buf = torch.empty(spans[0][1], K, device="cuda", dtype=torch.bfloat16)

    def mm_chunks(d):
        for n0, rows in spans:
            torch.mm(x, d[n0:n0 + rows].t(), out=out[:, n0:n0 + rows])

    def dequant(w):
        for n0, rows in spans:
            int4_dequantize(w.qweight, w.scales, w.zeros, ZERO_FLOAT, GROUP, torch.bfloat16, K,
                            out=buf[:rows], row0=n0, rows=rows, **dq)

    def fill():
        for _, rows in spans:
            buf[:rows].fill_(1.0)

    res = {"cublas": time_graph([lambda d=d: torch.nn.functional.linear(x, d) for d in dense]),
           "fill": time_graph([fill] * len(ws)),
           "mm_chunks": time_graph([lambda d=d: mm_chunks(d) for d in dense]),
           "dequant": time_graph([lambda w=w: dequant(w) for w in ws]),
           "path": time_graph([lambda w=w: int4_matmul(x, w.qweight, w.scales, w.zeros,
                                                       w.zero_kind, GROUP, algo="dequant", **cfg)
                               for w in ws])}
    dense = buf = None
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ms", default="512,2048")
    ap.add_argument("--chunks", default=None, help="e.g. 0,2048,4096: CHUNK_N values to try "
                    "(default: the table's)")
    ap.add_argument("--variants", nargs="*", default=[], help="JSON dicts of dequant options")
    a = ap.parse_args()
    variants = [{}] + [json.loads(v) for v in a.variants]
    print(f"# {torch.cuda.get_device_name()}  µs; path - cublas = dequant + chunking")
    print(f"{'K x N':>12} {'M':>5} {'CHUNK_N':>7} {'cublas':>8} {'mm_chunks':>9} {'dequant':>8} "
          f"{'fill':>7} {'path':>8} {'path/cublas':>11}  variant")
    for K, N, ws, M, algo, cfg in tuned_rows(SHAPES, [int(m) for m in a.ms.split(",")]):
        if algo != "dequant":
            cfg = dict(algo="dequant", BLOCK_N=64, BLOCK_K=128, num_warps=4, CHUNK_N=0)
        cfg = {k: v for k, v in cfg.items() if k != "algo"}
        chunks = [int(c) for c in a.chunks.split(",")] if a.chunks else [cfg.get("CHUNK_N", 0)]
        for c in chunks:
            for v in variants:
                r = parts(K, N, M, ws, dict(cfg, CHUNK_N=c, **v))
                print(f"{K:>5} x {N:<5} {M:>5} {c:>7} {r['cublas']:8.1f} {r['mm_chunks']:9.1f} "
                      f"{r['dequant']:8.1f} {r['fill']:7.1f} {r['path']:8.1f} "
                      f"{r['path'] / r['cublas']:11.2f}  {v or ''}", flush=True)


if __name__ == "__main__":
    main()
