"""Backend ``cpu``: torch's int4 CPU GEMM for small M, dequantize + dense GEMM for large M.

``aten._weight_int4pack_mm_for_cpu`` takes float zero points (w = (q - 8) * s + z), so integer
zero points are converted once at load: z = (8 - zp) * s. Group sizes 32/64/128/256 only (the
op's own limit). For large M the op is slower than a dense GEMM, so from
``DENSE_MIN_M`` rows on the weight is dequantized per call (cost ~N*K, amortized over M) from a
canonical copy of the codes and multiplied with torch's dense GEMM. The copy costs 0.5 byte per
weight; ``VLLM_INT4XPU_CPU_DENSE_MIN_M=0`` drops it (op only). The crossover was measured with
benchmarks/bench_cpu.py (BENCHMARKS.md).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..weight import Int4Weight, ZeroKind, unpack_int4
from .base import Int4Kernel, Int4LinearSpec, gather_act_order, permute_for_act_order

OP_GROUP_SIZES = (32, 64, 128, 256)
# Rows at and above which dequantize + dense GEMM beats the int4 op (measured, bench_cpu.py).
DENSE_MIN_M = int(os.environ.get("VLLM_INT4XPU_CPU_DENSE_MIN_M", "128"))  # 0 disables
DENSE_ROWS = 512  # output rows dequantized per block on the dense path


def _has_ops() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")


def _enable_amx() -> None:
    # Linux makes a thread ask for the AMX register state before its first AMX instruction.
    # oneDNN asks when a dense bf16 GEMM runs; when every linear layer is int4, nothing has
    # asked by the time vLLM's CPU attention (which uses AMX) runs, and it dies with SIGILL.
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init is not None:
        init()


class CpuKernel(Int4Kernel):
    name = "cpu"
    # packed: the op's uint8 layout (which depends on the CPU's vector ISA, so it is never
    # decoded here); qweight: canonical int32 copy for the dense large-M path (empty when that
    # path is disabled); scale_zero: [G, N, 2]; perm: act-order gather (or empty).
    tensor_names = ("packed", "qweight", "scale_zero", "perm")

    @classmethod
    def can_implement(cls, spec: Int4LinearSpec):
        if spec.device_type != "cpu":
            return False, f"device is {spec.device_type}, not cpu"
        if not _has_ops():
            return False, "this torch build lacks aten._weight_int4pack_mm_for_cpu"
        if spec.out_features % 16:
            return False, f"N={spec.out_features} not a multiple of 16 (torch CPU op limit)"
        if spec.group_size not in OP_GROUP_SIZES:
            return False, f"group size {spec.group_size} not in {OP_GROUP_SIZES} (torch CPU op limit)"
        if spec.act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"activation dtype {spec.act_dtype} unsupported"
        return True, None

    def prepare(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        _enable_amx()
        w, perm = permute_for_act_order(w)
        s = w.scales.to(torch.float32)
        if w.zero_kind == ZeroKind.NONE:
            z = torch.zeros_like(s)
        elif w.zero_kind == ZeroKind.INT:
            z = (8.0 - w.zeros.to(torch.float32)) * s
        else:
            z = w.zeros.to(torch.float32)
        scale_zero = torch.stack([s, z], dim=-1).to(self.spec.act_dtype).contiguous()
        codes = unpack_int4(w.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        qweight = w.qweight if DENSE_MIN_M > 0 else torch.empty(0, dtype=torch.int32)
        return {"packed": packed, "qweight": qweight, "scale_zero": scale_zero, "perm": perm}

    def apply(self, tensors, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        packed, qweight, scale_zero, perm = tensors
        x = gather_act_order(x, perm)
        if qweight.numel() and x.shape[0] >= DENSE_MIN_M:
            y = self._dense_matmul(x, qweight, scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.spec.group_size, scale_zero)
        if bias is not None:
            y = y + bias
        return y

    def _dense_matmul(self, x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
        """x @ W^T with W dequantized DENSE_ROWS output rows at a time, so each dequantized block
        is still in cache when the dense GEMM reads it (measured ~2x faster than dequantizing the
        whole weight first)."""
        N = self.spec.out_features
        y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
        for r0 in range(0, N, DENSE_ROWS):
            r1 = min(N, r0 + DENSE_ROWS)
            w = self._dequantize(qweight[r0:r1], scale_zero[:, r0:r1], x.dtype)
            torch.matmul(x, w.t(), out=y[:, r0:r1])
        return y

    def _dequantize(self, qweight: torch.Tensor, scale_zero: torch.Tensor, dtype) -> torch.Tensor:
        """Dense [n, K] rows from canonical codes: q * s + (z - 8 s), in ``dtype``."""
        n, K, g = qweight.shape[0], self.spec.in_features, self.spec.group_size
        b = qweight.view(torch.uint8)  # little-endian: byte j holds codes 2j (low) and 2j+1 (high)
        q = torch.empty(n, K // 2, 2, dtype=dtype)
        q[..., 0] = b & 0xF
        q[..., 1] = b >> 4
        s = scale_zero[..., 0].t().to(dtype).contiguous().unsqueeze(-1)
        z8 = (scale_zero[..., 1].t().float() - 8.0 * scale_zero[..., 0].t().float()).to(dtype)
        z8 = z8.contiguous().unsqueeze(-1)
        return torch.addcmul(z8, q.view(n, K // g, g), s).view(n, K)
