"""A/B one launch option of the Triton kernels on top of the tuned table, in one run (GPU).

    python3 benchmarks/tuning/ab_option.py --option K_FASTEST --values 0,1 --ms 1,2,4,8,16

For every shape and M, the dispatcher's own (algorithm, config) is timed as is and once per value
of the option (CUDA-graph replays over >= 256 MB of weight copies, as bench_kernels.py), with the
ratio to the row as tuned; a value the row's algorithm does not take is reported and skipped.
The same as ``sweep_overrides.py --variants '{"OPTION": v1}' '{"OPTION": v2}' ...``.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_overrides import parse_shapes, sweep  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--option", required=True, help="launch keyword, e.g. K_FASTEST")
    ap.add_argument("--values", default="0,1", help="JSON values, comma-separated")
    ap.add_argument("--ms", default="1,2,4,8,16")
    ap.add_argument("--shapes", default=None, help="KxN,... (default: the benchmark's four)")
    a = ap.parse_args()
    sweep(parse_shapes(a.shapes), [int(m) for m in a.ms.split(",")],
          [{a.option: json.loads(v)} for v in a.values.split(",")])


if __name__ == "__main__":
    main()
