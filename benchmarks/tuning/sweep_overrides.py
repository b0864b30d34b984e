"""Time the dispatcher's row against variants of it, in one run (GPU).

    python3 benchmarks/tuning/sweep_overrides.py --ms 2,16,64 \
        --variants '{"PERSIST": 3}' '{"PERSIST": 5, "BLOCK_N": 128}'

For every shape and M, the tuned (algorithm, config) is timed as is and with each variant's keys
replacing its own; a variant with an "algo" key is a whole config instead (CUDA-graph replays
over >= 256 MB of weight copies, as bench_kernels.py). A variant that fails to compile or launch
is reported and skipped. The last line per shape and M names the fastest. With --write TABLE, a
variant at least --min-gain faster than the row replaces it in that JSON table (a local search
around the tuned rows; keys set to null are dropped).
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


def parse_shapes(text):
    """'KxN,KxN' -> [(K, N), ...]; None -> the benchmark's four shapes."""
    return [tuple(int(v) for v in t.split("x")) for t in text.split(",")] if text else SHAPES


def sweep(shapes, ms, variants, write=None, min_gain=0.03):
    """Time each shape's tuned row and the row with each variant's keys replaced; with ``write``
    (a table path) store a variant at least ``min_gain`` faster than the row."""
    table = json.loads(Path(write).read_text()) if write else None
    print(f"# {torch.cuda.get_device_name()}  µs (ratio to the tuned row)")
    for K, N, ws, M, algo, cfg in tuned_rows(shapes, ms):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        results = []
        for v in [{}] + list(variants):
            # a variant naming an algorithm is a whole config of its own
            kw = dict(v) if "algo" in v else dict(cfg, **v)
            va = kw.pop("algo", algo)
            try:
                t = time_graph([lambda w=w: int4_matmul(
                    x, w.qweight, w.scales, w.zeros, w.zero_kind, GROUP, algo=va, **kw)
                    for w in ws])
            except Exception as e:  # noqa: BLE001  (e.g. out of shared memory, unknown key)
                print(f"  skip {v}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            results.append((t, v))
            print(f"{K:6d} {N:6d} M={M:<5d} {t:8.2f} ({t / results[0][0]:.2f})  {v or cfg}",
                  flush=True)
        if not results or results[0][1]:  # the row itself did not run: nothing to compare
            print(f"NO BASELINE {K}x{N} M={M}", flush=True)
            continue
        t, v = min(results, key=lambda r: r[0])
        full = dict(v) if "algo" in v else {**cfg, "algo": algo, **v}
        best = {k: val for k, val in full.items() if val is not None}
        print(f"BEST {K}x{N} M={M}: {t:.2f} us ({t / results[0][0]:.2f}) {best}", flush=True)
        if table is not None and t < (1 - min_gain) * results[0][0]:
            table.setdefault("shapes", {}).setdefault(f"{K}x{N}", {})[str(M)] = best
            Path(write).write_text(json.dumps(table, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", nargs="+", required=True, help="JSON dicts of overrides")
    ap.add_argument("--ms", default="2,16,64")
    ap.add_argument("--shapes", default=None, help="KxN,... (default: the benchmark's four)")
    ap.add_argument("--write", default=None, help="config table (JSON) to update with winners")
    ap.add_argument("--min-gain", type=float, default=0.03, help="e.g. 0.03: >= 3%% faster")
    a = ap.parse_args()
    sweep(parse_shapes(a.shapes), [int(m) for m in a.ms.split(",")],
          [json.loads(v) for v in a.variants], a.write, a.min_gain)


if __name__ == "__main__":
    main()
