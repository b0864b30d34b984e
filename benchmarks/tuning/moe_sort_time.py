"""The MoE token sort on the GPU: one launch (pairs fit one chunk) against the three launches,
µs per sort in a CUDA graph of 20, each checked against the torch sort first.

    python3 benchmarks/tuning/moe_sort_time.py

Shapes: Qwen3-30B-A3B (128 experts, top-8) at 16 and 4 tokens, Mixtral-8x7B (8, top-2) at 16
tokens; BLOCK_M 16 (the decode rows of the dot path).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_kernels import time_graph  # noqa: E402
from vllm_int4xpu.kernels.triton_kernels import fused_moe as fm  # noqa: E402


def main():
    for E, k, M in ((128, 8, 16), (8, 2, 16), (128, 8, 4)):
        ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(M)])
        ids = ids.to(torch.int32)
        res = {True: [], False: []}
        for one in (True, False, True, False):
            fm.SORT_ONE_LAUNCH = one
            ref, got = fm.sort_pairs(ids, E, 16), fm.sort_pairs_triton(ids, E, 16)
            n = int(ref[2])
            assert torch.equal(got[0][:n], ref[0][:n]) and torch.equal(got[1], ref[1])
            res[one].append(time_graph([lambda: fm.sort_pairs_triton(ids, E, 16)] * 20))
        fm.SORT_ONE_LAUNCH = True
        print(f"sort E={E} P={M * k}: one launch {min(res[True]):.2f} us, "
              f"three {min(res[False]):.2f} us (per sort, graph of 20)")


if __name__ == "__main__":
    main()
