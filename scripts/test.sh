#!/usr/bin/env bash
# Set up and run the default test suite (what CI runs). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m slow        # the slow end-to-end matrix
#   bash scripts/test.sh -n 0 -k moe    # one process (pytest's own output, pdb)
# The suite runs in INT4XPU_TEST_WORKERS (default 2) pytest-xdist workers, one test file per
# worker at a time: most of its time is single-threaded (vLLM start-up, Triton's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 \
    -n "${INT4XPU_TEST_WORKERS:-2}" --dist loadfile "$@"
