"""Choose a kernel backend for a layer: first in the device's order that can implement it.

Linear layers and fused-MoE layers have their own registries (``BACKENDS``/``ORDER`` and
``MOE_BACKENDS``/``MOE_ORDER``) and one rule. ``VLLM_INT4XPU_BACKEND=<name>`` forces one backend
for linear layers and ``VLLM_INT4XPU_MOE_BACKEND=<name>`` for MoE layers (an error, with its
reason, if it refuses). One log line per distinct decision names the choice and why each earlier
backend was refused.
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
ENV_MOE_BACKEND = "VLLM_INT4XPU_MOE_BACKEND"

# name -> "module:Class" (imported lazily: importing Triton or probing XPU ops is not free).
BACKENDS: dict[str, str] = {
    "xpu_onednn": "vllm_int4xpu.kernels.xpu_onednn:XpuOneDnnKernel",
    # Optional Intel GPU backends, used only when their package is importable and compatible.
    "xpu_vllm_kernels": "vllm_int4xpu.kernels.xpu_vllm_kernels:XpuVllmKernelsKernel",
    "ipex": "vllm_int4xpu.kernels.ipex:IpexKernel",
    "triton": "vllm_int4xpu.kernels.triton_backend:TritonKernel",
    "cpu_native": "vllm_int4xpu.kernels.cpu_native:CpuNativeKernel",
    "cpu": "vllm_int4xpu.kernels.cpu:CpuKernel",
    "reference": "vllm_int4xpu.kernels.reference:ReferenceKernel",
}

# Preference order per device type.
ORDER: dict[str, tuple[str, ...]] = {
    # oneDNN through torch first; vllm-xpu-kernels is the same oneDNN primitive for torch builds
    # without the aten op; IPEX is pinned to one torch minor version and unverified: after Triton.
    "xpu": ("xpu_onednn", "xpu_vllm_kernels", "triton", "ipex", "reference"),
    "cuda": ("triton", "reference"),
    # the project's own kernel (built on first use); torch's int4 op where it cannot be built
    "cpu": ("cpu_native", "cpu", "reference"),
}

# Fused-MoE backends (kernels/moe_*.py), same rules.
MOE_BACKENDS: dict[str, str] = {
    "xpu_onednn": "vllm_int4xpu.kernels.moe_per_expert:XpuOneDnnMoEKernel",
    "triton": "vllm_int4xpu.kernels.moe_triton:TritonMoEKernel",
    "cpu_native": "vllm_int4xpu.kernels.moe_per_expert:CpuNativeMoEKernel",
    "cpu": "vllm_int4xpu.kernels.moe_per_expert:CpuMoEKernel",
    "reference": "vllm_int4xpu.kernels.moe_per_expert:ReferenceMoEKernel",
}
# On XPU the fused Triton kernel (one launch, CUDA-graph safe) comes before the per-expert oneDNN
# loop, which reads the routing on the host.
MOE_ORDER: dict[str, tuple[str, ...]] = {
    "xpu": ("triton", "xpu_onednn", "reference"),
    "cuda": ("triton", "reference"),
    "cpu": ("cpu_native", "cpu", "reference"),
}


@functools.lru_cache(maxsize=None)
def load_backend(name: str, moe: bool = False):
    """The backend class (a MoE backend when ``moe``), or None when its module cannot be
    imported here."""
    registry = MOE_BACKENDS if moe else BACKENDS
    if name not in registry:
        raise Int4FormatError("unknown kernel backend",
                              tensor=ENV_MOE_BACKEND if moe else ENV_BACKEND,
                              expected=sorted(registry), found=name)
    mod, cls = registry[name].split(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:  # e.g. triton missing: a refusal, not a crash
        logger.debug("int4xpu backend %s not importable: %s", name, e)
        return None


def check_backend(name: str, spec, moe: bool = False) -> tuple[bool, str]:
    cls = load_backend(name, moe)
    if cls is None:
        return False, "module not importable on this install"
    if not moe and spec.uneven_act_order and not cls.keeps_g_idx:
        return False, ("act-order groups split unevenly across tensor-parallel ranks (no "
                       "permutation makes them contiguous; needs a backend that keeps g_idx)")
    ok, why = cls.can_implement(spec)
    return ok, (why or "")


def select_kernel(spec: Int4LinearSpec, forced: Optional[str] = None) -> type[Int4Kernel]:
    """Return the backend class for ``spec`` (honouring ``VLLM_INT4XPU_BACKEND``)."""
    return _select(spec, forced, moe=False)


def select_moe_kernel(spec, forced: Optional[str] = None):
    """Return the MoE backend class for an :class:`~.moe_base.Int4MoESpec` (honouring
    ``VLLM_INT4XPU_MOE_BACKEND``)."""
    return _select(spec, forced, moe=True)


def _select(spec, forced: Optional[str], moe: bool):
    env = ENV_MOE_BACKEND if moe else ENV_BACKEND
    # who asked: the caller (selfcheck, benchmarks, Int4Linear(backend=...)) or the user's env
    source = "requested by the caller" if forced else f"forced by {env}"
    forced = forced or os.environ.get(env) or None
    if forced:
        ok, why = check_backend(forced, spec, moe)
        if not ok:
            raise Int4FormatError(f"backend {forced!r} ({source}) cannot run this layer: {why}",
                                  tensor=env if source.startswith("forced") else "backend",
                                  expected="a backend that accepts the layer",
                                  found=_describe(spec))
        _log_choice(forced, spec, (source,))
        return load_backend(forced, moe)
    refused = []
    for name in (MOE_ORDER if moe else ORDER).get(spec.device_type, ("reference",)):
        ok, why = check_backend(name, spec, moe)
        if ok:
            _log_choice(name, spec, tuple(refused))
            return load_backend(name, moe)
        refused.append(f"{name}: {why}")
    raise Int4FormatError(f"no int4 {'MoE ' if moe else ''}kernel backend can run this layer",
                          expected="a backend", found="; ".join(refused))


def _describe(spec) -> str:
    if hasattr(spec, "num_experts"):  # Int4MoESpec
        g13 = "channel" if spec.group_w13 == spec.hidden else spec.group_w13
        g2 = "channel" if spec.group_w2 == spec.intermediate else spec.group_w2
        return (f"MoE E={spec.num_experts} H={spec.hidden} I={spec.intermediate} "
                f"group={g13}/{g2} zero={spec.zero_kind.value}"
                f"{' act-order' if spec.has_g_idx else ''}"
                f"{' (uneven groups)' if spec.uneven_act_order else ''} {spec.activation}"
                f" {str(spec.act_dtype).replace('torch.', '')} on {spec.device_type}")
    g = "channel" if spec.is_per_channel else spec.group_size
    return (f"K={spec.in_features} N={spec.out_features} group={g} zero={spec.zero_kind.value}"
            f"{' act-order' if spec.has_g_idx else ''}"
            f"{' (uneven groups)' if spec.uneven_act_order else ''}"
            f" {str(spec.act_dtype).replace('torch.', '')} on {spec.device_type}")


@functools.lru_cache(maxsize=256)
def _log_choice(name: str, spec, refused: tuple[str, ...]) -> None:
    why = f" (refused: {'; '.join(refused)})" if refused else ""
    logger.info("int4xpu: kernel backend %r for %s%s", name, _describe(spec), why)
