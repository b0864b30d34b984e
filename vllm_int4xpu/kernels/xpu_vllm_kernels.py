"""Backend ``xpu_vllm_kernels``: vllm-xpu-kernels' oneDNN w4a16 GEMM, when that package is installed.

Optional, never a hard dependency: the package is imported only when a layer on an Intel GPU asks,
and any failure is a refusal with its reason. It is the same oneDNN int4 matmul primitive as
``xpu_onednn`` uses through torch, shipped by the vLLM XPU build; it serves torch builds that lack
``aten._weight_int4pack_mm_with_scales_and_zeros``.

Call contract, as vLLM calls it (``XPUwNa16LinearKernel``) and as vllm-xpu-kernels'
``csrc/xpu/onednn/int4_gemm_w4a16.h`` reads it (NOT verified on hardware here):
``torch.ops._xpu_C.int4_gemm_w4a16(x2d, qweight.t(), bias, scales [K/g, N], zp, g, None)`` with

* ``qweight.t()``: the canonical int32 ``[N, K/8]`` seen as ``[K/8, N]`` (a transposed view, which
  the op detects as the "nt" layout);
* ``zp``: symmetric: int8 ``[8]`` (one element); asymmetric: u4 codes packed along N, i.e. int32
  ``[K/g, N/8]`` low nibble first (so N % 8 == 0);
* x fp16/bf16, K % 32 == 0, g a multiple of 32 (per-channel passed as g = K).

Float zero points run with zp = 8 plus the exact correction of :mod:`.float_zero`. Act-order is
permuted once at load, and ``x`` gathered per call (the op's own ``g_idx`` argument is not used).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..weight import Int4Weight, ZeroKind, pack_int4
from .base import Int4Kernel, Int4LinearSpec, gather_act_order, permute_for_act_order
from .float_zero import add_float_zero_correction

OP_NAME = "int4_gemm_w4a16"

_OVERRIDES: list[Callable[..., torch.Tensor]] = []


@functools.lru_cache(maxsize=1)
def _load_op() -> tuple[Optional[Callable[..., torch.Tensor]], str]:
    try:
        import vllm_xpu_kernels._xpu_C  # noqa: F401  (registers torch.ops._xpu_C)
    except Exception as e:  # ImportError, or a broken native library
        return None, f"vllm_xpu_kernels not importable ({type(e).__name__}: {e})"[:200]
    ns = getattr(torch.ops, "_xpu_C", None)
    if ns is None or not hasattr(ns, OP_NAME):
        return None, f"vllm_xpu_kernels has no torch.ops._xpu_C.{OP_NAME}"
    return getattr(ns, OP_NAME), ""


def current_op() -> tuple[Optional[Callable[..., torch.Tensor]], str]:
    """The op in force: the innermost :func:`use_op` (tests), else vllm-xpu-kernels' op."""
    if _OVERRIDES:
        return _OVERRIDES[-1], ""
    return _load_op()


@contextlib.contextmanager
def use_op(fn: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Point the backend at another implementation of ``int4_gemm_w4a16`` (emulation in tests)."""
    _OVERRIDES.append(fn)
    try:
        yield
    finally:
        _OVERRIDES.remove(fn)


class XpuVllmKernelsKernel(Int4Kernel):
    name = "xpu_vllm_kernels"
    tensor_names = ("qweight", "scales", "zeros", "float_zeros", "perm")

    @classmethod
    def can_implement(cls, spec: Int4LinearSpec):
        if spec.device_type != "xpu":
            return False, f"needs an Intel GPU (device xpu), layer is on {spec.device_type}"
        if spec.act_dtype not in (torch.float16, torch.bfloat16):
            return False, "int4_gemm_w4a16 takes float16/bfloat16 activations only"
        if spec.in_features % 32:
            return False, f"in_features {spec.in_features} not a multiple of 32"
        if spec.group_size % 32:
            return False, f"group size {spec.group_size} not a multiple of 32"
        if spec.zero_kind == ZeroKind.INT and spec.out_features % 8:
            return False, f"integer zero points need N % 8 == 0 (N={spec.out_features})"
        op, why = current_op()
        if op is None:
            return False, why
        return True, None

    def prepare(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        dev = w.qweight.device
        empty = torch.empty(0, device=dev)
        w, perm = permute_for_act_order(w)
        if w.zero_kind == ZeroKind.INT:
            zeros = pack_int4(w.zeros.to(torch.int32))  # [G, N/8], along N, low nibble first
        else:  # symmetric, or float zeros run with zp = 8 and the correction
            zeros = torch.full((1,), 8, dtype=torch.int8, device=dev)
        float_zeros = w.zeros.to(torch.float32).contiguous() if w.zero_kind == ZeroKind.FLOAT else empty
        return {"qweight": w.qweight.contiguous(),
                "scales": w.scales.to(self.spec.act_dtype).contiguous(),
                "zeros": zeros, "float_zeros": float_zeros, "perm": perm}

    def apply(self, tensors: Sequence[torch.Tensor], x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qweight, scales, zeros, float_zeros, perm = tensors
        spec, g = self.spec, self.spec.group_size
        out_dtype = x.dtype
        x = gather_act_order(x, perm if spec.has_g_idx else None).to(spec.act_dtype).contiguous()
        op, why = current_op()
        if op is None:
            raise RuntimeError(f"{self.name}: {why}")
        if spec.zero_kind == ZeroKind.FLOAT:
            y = op(x, qweight.t(), None, scales, zeros, g, None)
            y = add_float_zero_correction(y, x, float_zeros, g)
            if bias is not None:
                y = y + bias.to(y.dtype)
        else:
            y = op(x, qweight.t(), None if bias is None else bias.to(x.dtype), scales, zeros, g, None)
        return y.to(out_dtype)
