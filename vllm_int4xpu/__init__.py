"""vllm-int4xpu: int4 weight-only quantization for vLLM (Intel GPUs first, also CUDA and CPU).

``register()`` is the ``vllm.general_plugins`` entry point. It runs in every vLLM process, so it
is idempotent and cheap: it registers the ``int4xpu`` quantization method and imports no kernels.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register ``--quantization int4xpu`` with vLLM (safe to call any number of times)."""
    global _registered
    if _registered:
        return
    from .quant_method import register_with_vllm

    register_with_vllm()
    _registered = True
