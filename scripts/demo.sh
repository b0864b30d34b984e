#!/usr/bin/env bash
# The main job on the embedded default: set up, quantize SmolLM2-135M-Instruct to int4 (integer
# zero points, group 64), serve it with `vllm serve --quantization int4xpu` on 127.0.0.1, ask one
# chat question, print the answer and tokens/s, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/serve_smollm2.py "$@"
