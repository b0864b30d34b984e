"""Float zero points at integer-kernel speed: run an integer-zp kernel with zp = 8, then correct.

The float-zero convention (torchao/tinygemm/HQQ, DESIGN.md §1) is ``w = (q - 8)·s + z``. Split it:

    y = x @ W^T = Σ_k x_k·(q_kn - 8)·s_gn  +  Σ_g (Σ_{k∈g} x_k)·z_gn
                  `---- integer kernel, zp = 8 ----'   `--- correction: S @ Z ---'

where ``S = group_sums(x)`` is ``[M, G]`` and ``Z`` the float zeros ``[G, N]``. The identity is
exact (no approximation), and the correction is a GEMM 1/g the size of the main one, so any backend
whose fast kernel only takes integer zero points (oneDNN on XPU, vllm-xpu-kernels, IPEX, ...) can
serve float-zero checkpoints (HQQ, torchao) without the slow dequantize-then-matmul fallback.

Any backend uses it in three steps::

    prep = prepare_float_zeros(w)                  # once, after loading: zp=8 codes + fp32 Z
    y = int_kernel(x2d, ..., zeros=prep.int_zeros)  # the backend's own integer-zp call
    y = add_float_zero_correction(y, x2d, prep.float_zeros, w.group_size)

Act-order: permute the weight's input channels first (groups become contiguous), gather ``x`` the
same way, then group sums over contiguous runs are right.

Numerics: the group sums and the small GEMM run in fp32 (``Z`` is kept in fp32: it costs
``4·G·N`` bytes, 8/g of the int4 weight's bytes, 6 % at g = 128), and the sum with the integer
kernel's output is taken in fp32 before rounding once to the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import Int4FormatError
from ..weight import Int4Weight, ZeroKind

__all__ = ["FloatZeroPrep", "prepare_float_zeros", "group_sums", "float_zero_correction",
           "add_float_zero_correction", "constant_int_zeros"]

NEUTRAL_ZP = 8  # with zp = 8 the integer kernel computes (q - 8)·s, the float convention's base


@dataclass
class FloatZeroPrep:
    """What a backend keeps for a float-zero layer: integer zero points (all 8) and fp32 zeros."""

    int_zeros: torch.Tensor  # int8 [G, N], all NEUTRAL_ZP
    float_zeros: torch.Tensor  # float32 [G, N]


def constant_int_zeros(num_groups: int, n: int, device, value: int = NEUTRAL_ZP) -> torch.Tensor:
    """int8 [G, N] filled with ``value`` (the zero-point tensor for symmetric/float-zero layers)."""
    return torch.full((num_groups, n), value, dtype=torch.int8, device=device)


def prepare_float_zeros(w: Int4Weight, zeros_dtype: torch.dtype = torch.float32) -> FloatZeroPrep:
    """One-time split of a float-zero weight into (zp = 8 integer zeros, float zeros ``Z``).

    ``w`` must have plain contiguous groups (call ``permute_input_channels`` first for act-order).
    """
    if w.zero_kind != ZeroKind.FLOAT or w.zeros is None:
        raise Int4FormatError("float-zero correction needs a float-zero weight", tensor="zeros",
                              expected="zero_kind=float", found=ZeroKind(w.zero_kind).value)
    if w.g_idx is not None:
        raise Int4FormatError("permute act-order weights before preparing float zeros",
                              tensor="g_idx", expected=None, found="g_idx present")
    G, N = w.scales.shape
    return FloatZeroPrep(int_zeros=constant_int_zeros(G, N, w.qweight.device),
                         float_zeros=w.zeros.to(zeros_dtype).contiguous())


def group_sums(x2d: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[M, K] -> [M, K/g]: sum of x over each contiguous group of input channels (in ``dtype``)."""
    M, K = x2d.shape
    if group_size <= 0 or K % group_size:
        raise Int4FormatError("group size must divide the input width", tensor="x",
                              expected=f"a divisor of K={K}", found=group_size)
    return x2d.to(dtype).view(M, K // group_size, group_size).sum(-1)


def float_zero_correction(x2d: torch.Tensor, float_zeros: torch.Tensor, group_size: int,
                          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The exact correction term ``group_sums(x) @ Z`` ([M, N], in ``dtype`` or Z's dtype)."""
    calc = dtype or (float_zeros.dtype if float_zeros.dtype in (torch.float32, torch.float64)
                     else torch.float32)
    G = x2d.shape[1] // group_size if group_size > 0 else -1
    if float_zeros.dim() != 2 or float_zeros.shape[0] != G:
        raise Int4FormatError("float zeros do not match the input's groups", tensor="float_zeros",
                              expected=[G, "N"], found=list(float_zeros.shape))
    return group_sums(x2d, group_size, calc) @ float_zeros.to(calc)


def add_float_zero_correction(y: torch.Tensor, x2d: torch.Tensor, float_zeros: torch.Tensor,
                              group_size: int) -> torch.Tensor:
    """``y_int + group_sums(x) @ Z``, summed in (at least) fp32, returned in ``y``'s dtype.

    ``y`` is the integer kernel's output for the same ``x2d`` with every zero point equal to 8.
    """
    corr = float_zero_correction(x2d, float_zeros, group_size)
    return (y.to(corr.dtype) + corr).to(y.dtype)
