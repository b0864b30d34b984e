"""Choose a kernel backend for a layer: first in the device's order that can implement it.

``VLLM_INT4XPU_BACKEND=<name>`` forces one backend (an error, with its reason, if it refuses).
One log line per distinct decision names the choice and why each earlier backend was refused.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Optional

from ..errors import Int4FormatError
from .base import Int4Kernel, Int4LinearSpec

logger = logging.getLogger("vllm.int4xpu")

ENV_BACKEND = "VLLM_INT4XPU_BACKEND"

# name -> "module:Class" (imported lazily: importing Triton or probing XPU ops is not free).
BACKENDS: dict[str, str] = {
    "xpu_onednn": "vllm_int4xpu.kernels.xpu_onednn:XpuOneDnnKernel",
    # Optional Intel GPU backends, used only when their package is importable and compatible.
    "xpu_vllm_kernels": "vllm_int4xpu.kernels.xpu_vllm_kernels:XpuVllmKernelsKernel",
    "ipex": "vllm_int4xpu.kernels.ipex:IpexKernel",
    "triton": "vllm_int4xpu.kernels.triton_backend:TritonKernel",
    "cpu": "vllm_int4xpu.kernels.cpu:CpuKernel",
    "reference": "vllm_int4xpu.kernels.reference:ReferenceKernel",
}

# Preference order per device type.
ORDER: dict[str, tuple[str, ...]] = {
    # oneDNN through torch first; vllm-xpu-kernels is the same oneDNN primitive for torch builds
    # without the aten op; IPEX is pinned to one torch minor version and unverified: after Triton.
    "xpu": ("xpu_onednn", "xpu_vllm_kernels", "triton", "ipex", "reference"),
    "cuda": ("triton", "reference"),
    "cpu": ("cpu", "reference"),
}


@functools.lru_cache(maxsize=None)
def load_backend(name: str) -> Optional[type[Int4Kernel]]:
    """The backend class, or None when its module cannot be imported here."""
    if name not in BACKENDS:
        raise Int4FormatError("unknown kernel backend", tensor=ENV_BACKEND,
                              expected=sorted(BACKENDS), found=name)
    mod, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:  # e.g. triton missing: a refusal, not a crash
        logger.debug("int4xpu backend %s not importable: %s", name, e)
        return None


def check_backend(name: str, spec: Int4LinearSpec) -> tuple[bool, str]:
    cls = load_backend(name)
    if cls is None:
        return False, "module not importable on this install"
    if spec.uneven_act_order and not cls.keeps_g_idx:
        return False, ("act-order groups split unevenly across tensor-parallel ranks (no "
                       "permutation makes them contiguous; needs a backend that keeps g_idx)")
    ok, why = cls.can_implement(spec)
    return ok, (why or "")


def select_kernel(spec: Int4LinearSpec, forced: Optional[str] = None) -> type[Int4Kernel]:
    """Return the backend class for ``spec`` (honouring ``VLLM_INT4XPU_BACKEND``)."""
    forced = forced or os.environ.get(ENV_BACKEND) or None
    if forced:
        ok, why = check_backend(forced, spec)
        if not ok:
            raise Int4FormatError(f"forced backend {forced!r} cannot run this layer: {why}",
                                  tensor=ENV_BACKEND, expected="a backend that accepts the layer",
                                  found=_describe(spec))
        _log_choice(forced, spec, (f"forced by {ENV_BACKEND}",))
        return load_backend(forced)
    refused = []
    for name in ORDER.get(spec.device_type, ("reference",)):
        ok, why = check_backend(name, spec)
        if ok:
            _log_choice(name, spec, tuple(refused))
            return load_backend(name)
        refused.append(f"{name}: {why}")
    raise Int4FormatError("no int4 kernel backend can run this layer", expected="a backend",
                          found="; ".join(refused))


def _describe(spec: Int4LinearSpec) -> str:
    g = "channel" if spec.is_per_channel else spec.group_size
    return (f"K={spec.in_features} N={spec.out_features} group={g} zero={spec.zero_kind.value}"
            f"{' act-order' if spec.has_g_idx else ''}"
            f"{' (uneven groups)' if spec.uneven_act_order else ''}"
            f" {str(spec.act_dtype).replace('torch.', '')} on {spec.device_type}")


@functools.lru_cache(maxsize=256)
def _log_choice(name: str, spec: Int4LinearSpec, refused: tuple[str, ...]) -> None:
    why = f" (refused: {'; '.join(refused)})" if refused else ""
    logger.info("int4xpu: kernel backend %r for %s%s", name, _describe(spec), why)
