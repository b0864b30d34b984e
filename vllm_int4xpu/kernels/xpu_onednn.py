"""Backend ``xpu_onednn``: torch's own int4 weight-only GEMMs on Intel GPUs (oneDNN), no extra deps.

Two aten ops (DESIGN.md §3), both taking the canonical ``qweight`` int32 ``[N, K/8]`` as is:

* integer zero points, the fast path (a fused oneDNN w4a16 matmul):
  ``aten._weight_int4pack_mm_with_scales_and_zeros(x2d, qweight, g, scales [K/g, N], zeros int8
  [K/g, N])``, w = (q - zp)·s, g > 1 and a multiple of 32, x fp16/bf16.
  Symmetric weights pass zp = 8. Float zero points (w = (q - 8)·s + z) also take this path, with
  zp = 8 plus the exact correction ``y += group_sums(x) @ Z`` (:mod:`.float_zero`).
* float zero points, only where the correction cannot apply (group size 16, which oneDNN's int path
  refuses): ``aten._weight_int4pack_mm(x2d, qweight, g, scale_and_zero [K/g, N, 2])``,
  w = (q - 8)·s + z. Its M = 1 kernel read the wrong group's scale for g > 32 until torch-xpu-ops
  PR #5001 (merged late Aug 2026); on torch builds that may predate it (< 2.14) a single row is
  padded to two, which takes the op's (correct) dequantize-then-matmul branch instead.

Act-order weights are permuted once in :meth:`prepare`; ``x`` is gathered per call.

The ops are looked up through :func:`current_ops`, one small indirection, so the CPU-only tests can
point it at an emulator of the hardware ops (``tests/xpu_emulator.py``) or at shape-checking
wrappers around the ops' fake (meta) kernels, and run this file's real prepare/apply code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..weight import Int4Weight, ZeroKind
from .base import Int4Kernel, Int4LinearSpec, gather_act_order, permute_for_act_order
from .float_zero import add_float_zero_correction, constant_int_zeros, prepare_float_zeros

INT_ZP_OP = "_weight_int4pack_mm_with_scales_and_zeros"
FLOAT_ZP_OP = "_weight_int4pack_mm"
# First torch release assumed to carry the fix of torch-xpu-ops PR #5001 (M = 1, g > 32 gave wrong
# results). The fix merged in late Aug 2026; which release first pins it is not verified here, so
# every release before 2.14 is treated as affected (the workaround is correct either way).
FLOAT_ZP_M1_FIXED_IN = "2.14"

_ACT_DTYPES = (torch.bfloat16, torch.float16)
_NATIVE_FLOAT_GROUPS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class XpuInt4Ops:
    """The hardware ops this backend calls; ``None`` where this torch build lacks one."""

    int_zp_mm: Optional[Callable[..., torch.Tensor]]
    float_zp_mm: Optional[Callable[..., torch.Tensor]]
    float_zp_m1_buggy: bool  # whether float_zp_mm may be wrong at M = 1 with g > 32


def float_zp_m1_bug_expected(version: Optional[str] = None) -> bool:
    """True when this torch version may predate the M = 1 fix (see ``FLOAT_ZP_M1_FIXED_IN``)."""
    from torch.torch_version import TorchVersion

    return TorchVersion(version or torch.__version__) < FLOAT_ZP_M1_FIXED_IN


def aten_ops() -> XpuInt4Ops:
    """The real ops of this torch build (an op is ``None`` if the build does not have it)."""
    aten = torch.ops.aten
    return XpuInt4Ops(int_zp_mm=getattr(aten, INT_ZP_OP) if hasattr(aten, INT_ZP_OP) else None,
                      float_zp_mm=getattr(aten, FLOAT_ZP_OP) if hasattr(aten, FLOAT_ZP_OP) else None,
                      float_zp_m1_buggy=float_zp_m1_bug_expected())


_OVERRIDES: list[XpuInt4Ops] = []


def current_ops() -> XpuInt4Ops:
    """The ops in force: the innermost :func:`use_ops`, else this torch build's aten ops."""
    return _OVERRIDES[-1] if _OVERRIDES else aten_ops()


@contextlib.contextmanager
def use_ops(ops: XpuInt4Ops) -> Iterator[XpuInt4Ops]:
    """Run the backend against other implementations of the hardware ops (tests, emulation)."""
    _OVERRIDES.append(ops)
    try:
        yield ops
    finally:
        _OVERRIDES.remove(ops)


def native_float_zp_mm(ops: XpuInt4Ops, x2d: torch.Tensor, qweight: torch.Tensor, group_size: int,
                       scale_and_zero: torch.Tensor) -> torch.Tensor:
    """``aten._weight_int4pack_mm`` on XPU, never called with M = 1 and g > 32 on buggy builds."""
    if x2d.shape[0] == 1 and group_size > 32 and ops.float_zp_m1_buggy:
        padded = torch.nn.functional.pad(x2d, (0, 0, 0, 1))  # one zero row below
        return ops.float_zp_mm(padded, qweight, group_size, scale_and_zero).narrow(0, 0, 1)
    return ops.float_zp_mm(x2d, qweight, group_size, scale_and_zero)


def uses_int_path(spec: Int4LinearSpec) -> bool:
    """oneDNN's integer-zp matmul takes g > 1 with g % 32 == 0 (per-channel: K % 32 == 0)."""
    return spec.group_size > 1 and spec.group_size % 32 == 0


class XpuOneDnnKernel(Int4Kernel):
    name = "xpu_onednn"
    tensor_names = ("qweight", "scales", "zeros", "float_zeros", "scale_and_zero", "perm")

    @classmethod
    def can_implement(cls, spec: Int4LinearSpec):
        if spec.device_type != "xpu":
            return False, f"needs an Intel GPU (device xpu), layer is on {spec.device_type}"
        if spec.act_dtype not in _ACT_DTYPES:
            return False, (f"activation dtype {str(spec.act_dtype).replace('torch.', '')} not "
                           "supported: oneDNN int4 matmul takes float16/bfloat16")
        ops = current_ops()
        g = spec.group_size
        if uses_int_path(spec):
            if ops.int_zp_mm is None:
                return False, (f"this torch build has no aten.{INT_ZP_OP} "
                               "(XPU builds have it since about 2.7)")
            return True, None
        if g in _NATIVE_FLOAT_GROUPS and spec.zero_kind != ZeroKind.INT:
            if ops.float_zp_mm is None:
                return False, f"this torch build has no aten.{FLOAT_ZP_OP}"
            if spec.in_features % 16 or spec.out_features % 16:
                return False, (f"group size {g} uses aten.{FLOAT_ZP_OP}, which needs K and N "
                               f"multiples of 16 (K={spec.in_features}, N={spec.out_features})")
            return True, None
        what = "per-channel K" if spec.is_per_channel else "group size"
        return False, (f"{what} {g} not supported: oneDNN needs a multiple of 32 "
                       "(16 only with symmetric or float zero points)")

    # ------------------------------------------------------------------ load time
    def prepare(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        spec, dev = self.spec, w.qweight.device
        empty = torch.empty(0, device=dev)
        w, perm = permute_for_act_order(w)
        G, N = w.scales.shape
        scales = w.scales.to(spec.act_dtype).contiguous()
        out = {"qweight": w.qweight.contiguous(), "scales": scales, "zeros": empty,
               "float_zeros": empty, "scale_and_zero": empty, "perm": perm}
        if uses_int_path(spec):
            if w.zero_kind == ZeroKind.INT:
                out["zeros"] = w.zeros.to(torch.int8).contiguous()
            elif w.zero_kind == ZeroKind.FLOAT:
                fz = prepare_float_zeros(w)
                out["zeros"], out["float_zeros"] = fz.int_zeros, fz.float_zeros
            else:
                out["zeros"] = constant_int_zeros(G, N, dev)
        else:
            z = (w.zeros.to(spec.act_dtype) if w.zero_kind == ZeroKind.FLOAT
                 else torch.zeros_like(scales))  # symmetric: (q - 8)·s + 0
            out["scale_and_zero"] = torch.stack([scales, z], dim=-1).contiguous()
            out["scales"] = empty
        return out

    # ------------------------------------------------------------------ per call
    def apply(self, tensors: Sequence[torch.Tensor], x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qweight, scales, zeros, float_zeros, scale_and_zero, perm = tensors
        spec, g = self.spec, self.spec.group_size
        out_dtype = x.dtype
        x = gather_act_order(x, perm if spec.has_g_idx else None)
        x = x.to(spec.act_dtype).contiguous()
        if x.shape[0] == 0:
            y = x.new_empty(0, spec.out_features)
        elif uses_int_path(spec):
            ops = current_ops()
            y = ops.int_zp_mm(x, qweight, g, scales, zeros)
            if spec.zero_kind == ZeroKind.FLOAT:
                y = add_float_zero_correction(y, x, float_zeros, g)
        else:
            y = native_float_zp_mm(current_ops(), x, qweight, g, scale_and_zero)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(out_dtype)
