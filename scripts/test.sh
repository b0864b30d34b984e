#!/usr/bin/env bash
# Set up and run the default test suite (what CI runs). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m slow        # the slow end-to-end matrix
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
