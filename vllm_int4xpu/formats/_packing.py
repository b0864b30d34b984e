"""Bit-level helpers shared by the checkpoint format adapters (GPTQ, AWQ, compressed-tensors,
AutoRound, HQQ, torchao). Pure torch; every function maps one on-disk packing to int4 codes.

Conventions: "packed along the last dim" means 8 codes per int32 word, code i at bits 4*i (low
nibble first) -- the canonical layout of :mod:`vllm_int4xpu.weight`. GPTQ packs ``qweight``
along dim 0 (input channels) and ``qzeros`` along dim 1 (output channels) with that nibble
order; AWQ packs along the output dim with the interleaved order 0,2,4,6,1,3,5,7.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import Int4FormatError
from ..weight import PACK_FACTOR, pack_int4, unpack_int4

# AutoAWQ writes output column AWQ_PACK_ORDER[i] into nibble i of each word.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# ... so output column j of a word sits in nibble AWQ_UNPACK_ORDER[j].
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def expect(t: Optional[torch.Tensor], name: str, shape, dtype=None, *, file=None,
           fmt: str = "") -> torch.Tensor:
    """Check presence, shape (None entries = any) and dtype of one tensor; return it."""
    pre = f"{fmt}: " if fmt else ""
    if t is None:
        raise Int4FormatError(f"{pre}tensor missing", file=file, tensor=name,
                              expected=list(shape), found=None)
    if dtype is not None and t.dtype != dtype:
        raise Int4FormatError(f"{pre}wrong dtype", file=file, tensor=name, expected=str(dtype),
                              found=str(t.dtype))
    if t.dim() != len(shape) or any(e is not None and e != f for e, f in zip(shape, t.shape)):
        raise Int4FormatError(f"{pre}wrong shape", file=file, tensor=name, expected=list(shape),
                              found=list(t.shape))
    return t


def expect_float(t: torch.Tensor, name: str, *, file=None, fmt: str = "") -> torch.Tensor:
    pre = f"{fmt}: " if fmt else ""
    if not t.is_floating_point():
        raise Int4FormatError(f"{pre}expected a float tensor", file=file, tensor=name,
                              expected="float16/bfloat16/float32", found=str(t.dtype))
    if not torch.isfinite(t).all():
        raise Int4FormatError(f"{pre}tensor contains NaN or inf", file=file, tensor=name,
                              expected="finite values", found="non-finite")
    return t


def as_int32(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret a 32-bit integer tensor (int32/uint32) as int32 bits."""
    if t.dtype == torch.int32:
        return t
    if t.dtype == torch.uint32:
        return t.view(torch.int32)
    raise Int4FormatError("packed int4 tensor must be 32-bit integers", expected="torch.int32",
                          found=str(t.dtype))


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R/8, C] packed along dim 0 (GPTQ qweight) -> uint8 codes [R, C]."""
    return unpack_int4(as_int32(packed).t().contiguous()).t()


def gptq_qweight_to_canonical(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight int32 [K/8, N] -> canonical int32 [N, K/8] (the same words, transposed)."""
    return as_int32(qweight).t().contiguous()


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [R, C/8] (interleaved nibble order) -> uint8 codes [R, C] in column order."""
    codes = unpack_int4(as_int32(packed)).view(packed.shape[0], -1, PACK_FACTOR)
    return codes[..., list(AWQ_UNPACK_ORDER)].reshape(packed.shape[0], -1)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_awq` (used by tests and fixture writers)."""
    c = codes.view(codes.shape[0], -1, PACK_FACTOR)[..., list(AWQ_PACK_ORDER)]
    return pack_int4(c.reshape(codes.shape[0], -1))


def codes_to_canonical(codes_nk: torch.Tensor) -> torch.Tensor:
    """uint8/int codes [N, K] -> canonical qweight int32 [N, K/8]."""
    return pack_int4(codes_nk.to(torch.int32))


def zero_codes(packed: torch.Tensor, offset: int, *, tensor: str, file=None,
               fmt: str = "", max_zp: int = 15) -> torch.Tensor:
    """Packed-along-last-dim zero points -> int8 [G, N] zp = code + offset, checked in 0..max_zp.

    GPTQ v1 (and AutoRound's GPTQ export) store zp - 1, so ``offset`` is 1 there, and a stored
    15 means zp 16: old GPTQ packers wrote zp 0 as -1 (which also sets the higher nibbles of its
    word to 15). The producers' own dequantization and vLLM's GPTQ kernels read that as 16, so
    the GPTQ adapter passes ``max_zp=16`` and turns such layers into exact float zero points.
    """
    zp = unpack_int4(as_int32(packed)).to(torch.int16) + offset
    if zp.numel() and (int(zp.min()) < 0 or int(zp.max()) > max_zp):
        raise Int4FormatError(f"{fmt + ': ' if fmt else ''}zero points out of range", file=file,
                              tensor=tensor, expected=f"stored codes {0 - offset}..{max_zp - offset}",
                              found=f"{int(zp.min()) - offset}..{int(zp.max()) - offset}")
    return zp.to(torch.int8)


def check_g_idx(g_idx: torch.Tensor, K: int, groups: int, *, tensor: str, file=None,
                fmt: str = "") -> torch.Tensor:
    pre = f"{fmt}: " if fmt else ""
    if g_idx.dim() != 1 or g_idx.shape[0] != K:
        raise Int4FormatError(f"{pre}g_idx has the wrong length", file=file, tensor=tensor,
                              expected=[K], found=list(g_idx.shape))
    if g_idx.is_floating_point():
        raise Int4FormatError(f"{pre}g_idx must be integers", file=file, tensor=tensor,
                              expected="torch.int32", found=str(g_idx.dtype))
    g = g_idx.to(torch.int32)
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise Int4FormatError(f"{pre}g_idx out of range", file=file, tensor=tensor,
                              expected=f"0..{groups - 1}", found=f"{int(g.min())}..{int(g.max())}")
    return g


def is_trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when g_idx[k] == k // group_size (no act-order: the tensor carries no information)."""
    ref = torch.arange(g_idx.shape[0], device=g_idx.device) // group_size
    return bool(torch.equal(g_idx.to(torch.int64), ref))
