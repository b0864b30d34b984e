"""CPU emulation of the two aten int4 ops the XPU backend calls, for tests only.

Written from the ops' documented contract (torch's XPU ``Blas.cpp`` argument checks, oneDNN's
weight description in ``WoQMatmul.cpp``, torch-xpu-ops' ``LinearInt4.cpp``/``Dequant_int4.cpp``),
not from :func:`vllm_int4xpu.weight.dequantize`:

* the weight is read the way the hardware reads it: the int32 ``[N, K/8]`` tensor as raw bytes
  (little-endian), element (n, k) in byte ``n*K/2 + k//2``, even k in the low nibble;
* ``_weight_int4pack_mm_with_scales_and_zeros``: w = (q - zp)·s, zp int8 per group;
* ``_weight_int4pack_mm`` (XPU flavour): w = (q - 8)·s + z from ``scale_and_zero [K/g, N, 2]``,
  optionally reproducing the pre-fix M = 1 bug (every 32-wide K slice read group 0's scale/zero).

Each call first checks its arguments like the real op (``check_*``; these checkers are reused by
the fake-tensor tests on top of torch's meta kernels, which check much less), then computes in
float64 with explicit loops over groups and nibbles, and returns the op's output dtype (or float64
when given float64 inputs with ``allow_float64``, for exactness tests). Every call is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_int4xpu.kernels.xpu_onednn import XpuInt4Ops

HALF_TYPES = (torch.float16, torch.bfloat16)


class OpContractError(AssertionError):
    """An argument the real op would reject (its TORCH_CHECK / oneDNN requirement)."""


def _req(cond: bool, msg: str) -> None:
    if not cond:
        raise OpContractError(msg)


def _same_device(*ts: torch.Tensor) -> None:
    devs = {str(t.device) for t in ts}
    _req(len(devs) == 1, f"all arguments must be on one device, got {sorted(devs)}")


def check_int_zp_mm(x, w, group_size, scale, zeros, *, allow_float64: bool = False) -> None:
    """Argument contract of aten._weight_int4pack_mm_with_scales_and_zeros on XPU."""
    ok_x = HALF_TYPES + ((torch.float64,) if allow_float64 else ())
    # Blas.cpp accepts float32 too, but the cached oneDNN path asserts fp16/bf16: treat as invalid.
    _req(x.dtype in ok_x, f"x dtype {x.dtype}: expected float16/bfloat16")
    _req(x.dim() == 2 and x.is_contiguous(), f"x must be 2-D contiguous, got {tuple(x.shape)}")
    M, K = x.shape
    _req(w.dtype == torch.int32 and w.dim() == 2, f"w must be 2-D int32, got {w.dtype} {w.dim()}-D")
    _req(w.is_contiguous(), "w must be contiguous ([N, K/8], K contiguous)")
    N = w.shape[0]
    _req(w.shape[1] * 8 == K, f"w must be [N, K/8] = [{N}, {K // 8}], got {tuple(w.shape)}")
    _req(isinstance(group_size, int) and group_size > 1 and group_size % 32 == 0,
         f"group size must be > 1 and a multiple of 32, got {group_size}")
    _req(K % group_size == 0, f"group size {group_size} must divide K={K}")
    G = K // group_size
    _req(scale.dim() == 2 and tuple(scale.shape) == (G, N) and scale.is_contiguous(),
         f"scale must be contiguous [{G}, {N}], got {tuple(scale.shape)}")
    _req(scale.dtype in HALF_TYPES + (torch.float32,) + ((torch.float64,) if allow_float64 else ()),
         f"scale dtype {scale.dtype} not a float type oneDNN takes")
    _req(zeros.dtype == torch.int8, f"zeros must be int8, got {zeros.dtype}")
    _req(zeros.dim() == 2 and tuple(zeros.shape) == (G, N) and zeros.is_contiguous(),
         f"zeros must be contiguous [{G}, {N}], got {tuple(zeros.shape)}")
    _same_device(x, w, scale, zeros)


def check_float_zp_mm(x, w, group_size, scale_and_zero, *, allow_float64: bool = False) -> None:
    """Argument contract of aten._weight_int4pack_mm on XPU (torch-xpu-ops LinearInt4)."""
    ok_x = HALF_TYPES + ((torch.float64,) if allow_float64 else ())
    # The check admits float32, but both kernels dispatch on reduced float types only.
    _req(x.dtype in ok_x, f"x dtype {x.dtype}: expected float16/bfloat16")
    _req(x.dim() == 2 and x.is_contiguous(), f"x must be 2-D contiguous, got {tuple(x.shape)}")
    M, K = x.shape
    _req(w.dtype in (torch.int32, torch.uint8) and w.dim() == 2 and w.is_contiguous(),
         f"w must be contiguous 2-D int32/uint8, got {w.dtype} {tuple(w.shape)}")
    N = w.shape[0]
    _req(w.shape[1] * (8 if w.dtype == torch.int32 else 2) == K, f"w {tuple(w.shape)} does not hold K={K}")
    _req(group_size in (16, 32, 64, 128, 256), f"group size must be 16/32/64/128/256, got {group_size}")
    _req(K % group_size == 0 and K % 16 == 0 and N % 16 == 0,
         f"K={K}, N={N} must be multiples of 16 and of the group size")
    G = K // group_size
    _req(tuple(scale_and_zero.shape) == (G, N, 2) and scale_and_zero.is_contiguous(),
         f"scale_and_zero must be contiguous [{G}, {N}, 2], got {tuple(scale_and_zero.shape)}")
    _req(scale_and_zero.dtype == x.dtype, f"scale_and_zero dtype {scale_and_zero.dtype} != x {x.dtype}")
    _same_device(x, w, scale_and_zero)


def hardware_codes(w: torch.Tensor, K: int) -> torch.Tensor:
    """Codes [N, K] (int64) read as the hardware does: raw little-endian bytes, low nibble first."""
    N = w.shape[0]
    raw = w.contiguous().view(torch.uint8).reshape(N, K // 2).to(torch.int64)
    codes = torch.empty(N, K, dtype=torch.int64)
    codes[:, 0::2] = raw & 0x0F  # even k: low nibble
    codes[:, 1::2] = raw >> 4    # odd k: high nibble
    return codes


@dataclass
class XpuOpEmulator:
    """Emulated XPU int4 ops; ``ops()`` gives the object the backend's ``use_ops`` takes."""

    allow_float64: bool = False
    m1_bug: bool = False  # reproduce the pre-PR-#5001 M = 1, g > 32 bug of _weight_int4pack_mm
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def ops(self, *, float_zp_m1_buggy: bool = True) -> XpuInt4Ops:
        return XpuInt4Ops(int_zp_mm=self.int_zp_mm, float_zp_mm=self.float_zp_mm,
                          float_zp_m1_buggy=float_zp_m1_buggy)

    def _record(self, name, **kw):
        self.calls.append((name, {k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v
                                  for k, v in kw.items()}))

    def int_zp_mm(self, x, w, group_size, scale, zeros):
        check_int_zp_mm(x, w, group_size, scale, zeros, allow_float64=self.allow_float64)
        self._record("int_zp_mm", x=x, w=w, group_size=group_size, scale=scale, zeros=zeros)
        M, K = x.shape
        N = w.shape[0]
        codes = hardware_codes(w, K).to(torch.float64)  # [N, K]
        dense = torch.empty(K, N, dtype=torch.float64)
        for gi in range(K // group_size):  # one quantization group at a time
            ks = slice(gi * group_size, (gi + 1) * group_size)
            zp = zeros[gi].to(torch.float64)  # [N]
            s = scale[gi].to(torch.float64)
            dense[ks] = ((codes[:, ks] - zp[:, None]) * s[:, None]).t()
        y = x.to(torch.float64) @ dense
        return y.to(x.dtype)

    def float_zp_mm(self, x, w, group_size, scale_and_zero):
        check_float_zp_mm(x, w, group_size, scale_and_zero, allow_float64=self.allow_float64)
        self._record("float_zp_mm", x=x, w=w, group_size=group_size, scale_and_zero=scale_and_zero)
        M, K = x.shape
        N = w.shape[0]
        codes = hardware_codes(w, K).to(torch.float64)
        sz = scale_and_zero.to(torch.float64)
        dense = torch.empty(K, N, dtype=torch.float64)
        buggy = self.m1_bug and M == 1 and group_size > 32
        for gi in range(K // group_size):
            ks = slice(gi * group_size, (gi + 1) * group_size)
            row = 0 if buggy else gi  # the bug: (sg_id * (32 / g)) == 0 for every slice
            s, z = sz[row, :, 0], sz[row, :, 1]
            dense[ks] = ((codes[:, ks] - 8.0) * s[:, None] + z[:, None]).t()
        y = x.to(torch.float64) @ dense
        return y.to(x.dtype)

    def op_names(self) -> list[str]:
        return [c[0] for c in self.calls]


def check_int4_gemm_w4a16(x, b, bias, scale, zp, group_size, g_idx) -> None:
    """Argument contract of vllm-xpu-kernels' torch.ops._xpu_C.int4_gemm_w4a16 (csrc/xpu/onednn)."""
    _req(x.dtype in HALF_TYPES, f"x dtype {x.dtype}: expected float16/bfloat16")
    _req(x.dim() == 2 and x.stride(-1) == 1, "x must be 2-D with a contiguous last dim")
    M, K = x.shape
    _req(b.dtype == torch.int32 and b.dim() == 2 and b.shape[0] * 8 == K,
         f"B must be int32 [K/8, N], got {b.dtype} {tuple(b.shape)}")
    _req(b.stride(0) == 1 and b.stride(1) == K // 8, "B must be the transposed view of [N, K/8]")
    N = b.shape[1]
    _req(group_size > 0 and group_size % 32 == 0 and K % group_size == 0,
         f"group size {group_size} must be a multiple of 32 dividing K={K}")
    G = K // group_size
    _req(tuple(scale.shape) == (G, N) and scale.is_contiguous() and scale.dtype == x.dtype,
         f"scale must be contiguous [{G}, {N}] {x.dtype}, got {tuple(scale.shape)} {scale.dtype}")
    if zp.dim() == 1:
        _req(zp.dtype == torch.int8 and zp.numel() == 1, "symmetric zp must be int8 [1]")
    else:
        _req(zp.dtype == torch.int32 and tuple(zp.shape) == (G, N // 8) and zp.is_contiguous(),
             f"asymmetric zp must be u4 packed int32 [{G}, {N // 8}], got {zp.dtype} {tuple(zp.shape)}")
    if bias is not None:
        _req(tuple(bias.shape) == (N,), f"bias must be [{N}]")
    _req(g_idx is None, "this emulation covers g_idx=None only")


def emulate_int4_gemm_w4a16(x, b, bias, scale, zp, group_size, g_idx=None):
    check_int4_gemm_w4a16(x, b, bias, scale, zp, group_size, g_idx)
    M, K = x.shape
    N = b.shape[1]
    codes = hardware_codes(b.t(), K).to(torch.float64)  # b.t() is the [N, K/8] storage
    if zp.dim() == 1:
        zps = torch.full((K // group_size, N), float(zp[0]), dtype=torch.float64)
    else:  # u4 along N: byte j of a row holds n = 2j (low nibble) and n = 2j + 1 (high nibble)
        raw = zp.contiguous().view(torch.uint8).to(torch.int64)  # [G, N/2]
        zps = torch.empty(raw.shape[0], N, dtype=torch.float64)
        zps[:, 0::2] = (raw & 0x0F).to(torch.float64)
        zps[:, 1::2] = (raw >> 4).to(torch.float64)
    dense = torch.empty(K, N, dtype=torch.float64)
    for gi in range(K // group_size):
        ks = slice(gi * group_size, (gi + 1) * group_size)
        dense[ks] = ((codes[:, ks] - zps[gi][:, None]) * scale[gi].to(torch.float64)[:, None]).t()
    y = x.to(torch.float64) @ dense
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
