"""One profiled call of our small-M kernel (and tinygemm on the same weight) for Nsight Compute.

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats \
        python3 benchmarks/tuning/ncu_small_m.py --shape 4096x28672 --m 1 \
        --cfg '{"algo": "gemv", "BLOCK_N": 128, "BLOCK_K": 256, "SPLIT_K": 8, "num_warps": 4}'

Only the calls between cudaProfilerStart/Stop are profiled (after a warm-up that compiles).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_kernels (--tinygemm)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_int4xpu.kernels.triton_backend import int4_matmul  # noqa: E402
from vllm_int4xpu.weight import ZeroKind, quantize_rtn  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="4096x28672", help="KxN")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--cfg", default="{}", help="JSON: algo + launch params (default: dispatch)")
    ap.add_argument("--tinygemm", action="store_true", help="also profile torch's tinygemm")
    a = ap.parse_args()
    K, N = (int(v) for v in a.shape.split("x"))
    w = quantize_rtn(torch.randn(N, K, device="cuda"), 128, ZeroKind.FLOAT,
                     scale_dtype=torch.bfloat16)
    x = torch.randn(a.m, K, device="cuda", dtype=torch.bfloat16)
    cfg = json.loads(a.cfg)
    algo = cfg.pop("algo", None)

    def ours():
        return int4_matmul(x, w.qweight, w.scales, w.zeros, w.zero_kind, 128, algo=algo, **cfg)

    calls = [ours]
    if a.tinygemm:
        from bench_kernels import tinygemm_pack  # noqa: E402  (same packing as the benchmark)
        packed, sz = tinygemm_pack(w)
        calls.append(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz))
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
