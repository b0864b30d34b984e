"""A/B one launch option of the Triton kernels on top of the tuned table, in one run (GPU).

    python3 benchmarks/ab_option.py --option K_FASTEST --values 0,1 --ms 1,2,4,8,16

For every shape and M, the dispatcher's own (algorithm, config) is timed once per value of the
option (CUDA-graph replays over >= 256 MB of weight copies, as bench_kernels.py), and the ratio
to the first value is printed.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import GROUP, L2_DEFEAT_BYTES, SHAPES, make_weights, time_graph  # noqa: E402
from vllm_int4xpu.kernels.triton_backend import choose_config, device_family, int4_matmul  # noqa: E402,E501


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--option", required=True, help="launch keyword, e.g. K_FASTEST")
    ap.add_argument("--values", default="0,1", help="JSON values, comma-separated")
    ap.add_argument("--ms", default="1,2,4,8,16")
    ap.add_argument("--shapes", default=None, help="KxN,... (default: the benchmark's four)")
    a = ap.parse_args()
    values = [json.loads(v) for v in a.values.split(",")]
    shapes = ([tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes
              else SHAPES)
    fam = device_family(torch.device("cuda"))
    print(f"# {torch.cuda.get_device_name()}  {a.option} in {values}  (µs, ratio to the first)")
    for K, N in shapes:
        copies = max(2, min(24, math.ceil(L2_DEFEAT_BYTES / (N * K // 2))))
        ws = make_weights(K, N, copies)
        for M in (int(m) for m in a.ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            algo, cfg = choose_config(fam, M, K, N, GROUP)
            ts = []
            for v in values:
                kw = dict(cfg, **{a.option: v})
                try:
                    ts.append(time_graph([lambda w=w: int4_matmul(
                        x, w.qweight, w.scales, w.zeros, w.zero_kind, GROUP, algo=algo, **kw)
                        for w in ws]))
                except KeyError:  # the option is not a parameter of this row's algorithm
                    break
            if len(ts) < len(values):
                print(f"{K:6d} {N:6d} M={M:<5d} {algo:5s} has no {a.option}", flush=True)
                continue
            cells = "  ".join(f"{t:8.1f} ({t / ts[0]:.2f})" for t in ts)
            print(f"{K:6d} {N:6d} M={M:<5d} {algo:5s} split-K {cfg.get('SPLIT_K', 1):2d}  {cells}",
                  flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
