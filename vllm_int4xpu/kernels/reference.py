"""Backend ``reference``: dequantize the whole weight, then one dense matmul.

Runs on any device and any layout the canonical weight can express (act-order included). It is
the fallback of last resort and the numerical twin of :func:`vllm_int4xpu.weight.dequantize`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..weight import Int4Weight, ZeroKind, dequantize
from .base import Int4Kernel, Int4LinearSpec

_EMPTY = torch.empty(0)


def weight_to_tensors(w: Int4Weight) -> dict[str, torch.Tensor]:
    """Canonical weight as four tensors (missing ones as empty placeholders)."""
    empty = _EMPTY.to(w.qweight.device)
    return {"qweight": w.qweight, "scales": w.scales,
            "zeros": w.zeros if w.zeros is not None else empty,
            "g_idx": w.g_idx if w.g_idx is not None else empty}


def weight_from_tensors(spec: Int4LinearSpec, t: Sequence[torch.Tensor]) -> Int4Weight:
    qweight, scales, zeros, g_idx = t
    return Int4Weight(qweight=qweight, scales=scales,
                      zeros=zeros if spec.zero_kind != ZeroKind.NONE else None,
                      zero_kind=spec.zero_kind, group_size=spec.group_size,
                      in_features=spec.in_features, out_features=spec.out_features,
                      g_idx=g_idx if spec.has_g_idx else None)


class ReferenceKernel(Int4Kernel):
    name = "reference"
    tensor_names = ("qweight", "scales", "zeros", "g_idx")
    keeps_g_idx = True  # dequantizes with g_idx as it is

    @classmethod
    def can_implement(cls, spec: Int4LinearSpec):
        return True, None

    def prepare(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        return weight_to_tensors(w)

    def apply(self, tensors, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = dequantize(weight_from_tensors(self.spec, tensors), torch.float32).to(x.dtype)
        return F.linear(x, w, bias)
