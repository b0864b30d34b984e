"""Backend ``ipex``: Intel Extension for PyTorch's weight-only int4 linear on Intel GPUs, if usable.

Optional, never a hard dependency. IPEX builds are tied to one torch minor version (IPEX 2.8 needs
torch 2.8) and a mismatched IPEX exits the interpreter on import, so the installed distribution's
version is compared with torch's *before* anything is imported; a mismatch is a refusal.

What it calls (as vLLM's former IPEX path and IPEX's own tests do; NOT verified on hardware here):
``ipex.llm.quantization.IPEXWeightOnlyQuantizedLinear.from_weight(qweight [K/8, N] (GPTQ layout),
scales [K/g, N], zero_points, K, N, group_size=g, quant_method=GPTQ_GEMM, dtype=INT4)``, then
``module(x2d)``. Only the symmetric form (zero point tensor ``[8]``) is used: IPEX's packing of
asymmetric GPTQ zero points (with or without the v1 "-1") is not something this project could
check, so integer zero points are refused. Float zero points run symmetric plus the exact
correction of :mod:`.float_zero`; act-order is permuted at load.

IPEX keeps its repacked weight inside a module object, which does not fit the stateless
``apply(tensors, x)`` contract: the module is built on first use and cached per weight storage.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any, Optional, Sequence

import torch

from ..weight import Int4Weight, ZeroKind
from .base import Int4Kernel, Int4LinearSpec, gather_act_order, permute_for_act_order
from .float_zero import add_float_zero_correction

DIST = "intel_extension_for_pytorch"


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


@functools.lru_cache(maxsize=1)
def _load_ipex() -> tuple[Optional[Any], str]:
    try:
        ver = importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None, "intel_extension_for_pytorch not installed"
    if _minor(ver) != _minor(torch.__version__):
        return None, f"intel_extension_for_pytorch {ver} does not match torch {torch.__version__}"
    try:
        ipex = importlib.import_module(DIST)
        ipex.llm.quantization.IPEXWeightOnlyQuantizedLinear  # noqa: B018 (API present?)
    except BaseException as e:  # IPEX may sys.exit() on an incompatible runtime
        return None, f"intel_extension_for_pytorch unusable ({type(e).__name__}: {e})"[:200]
    return ipex, ""


class IpexKernel(Int4Kernel):
    name = "ipex"
    tensor_names = ("qweight", "scales", "float_zeros", "perm")

    def __init__(self, spec: Int4LinearSpec):
        super().__init__(spec)
        self._modules: dict[tuple[int, int], Any] = {}

    @classmethod
    def can_implement(cls, spec: Int4LinearSpec):
        if spec.device_type != "xpu":
            return False, f"needs an Intel GPU (device xpu), layer is on {spec.device_type}"
        if spec.act_dtype not in (torch.float16, torch.bfloat16):
            return False, "IPEX int4 weight-only linear takes float16/bfloat16 here"
        if spec.zero_kind == ZeroKind.INT:
            return False, "integer zero points not wired for IPEX (its asym GPTQ zp convention is unverified)"
        if spec.group_size % 32:
            return False, f"group size {spec.group_size} not a multiple of 32"
        ipex, why = _load_ipex()
        if ipex is None:
            return False, why
        return True, None

    def prepare(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        dev = w.qweight.device
        w, perm = permute_for_act_order(w)
        fz = (w.zeros.to(torch.float32).contiguous() if w.zero_kind == ZeroKind.FLOAT
              else torch.empty(0, device=dev))
        return {"qweight": w.qweight.t().contiguous(),  # GPTQ layout [K/8, N]
                "scales": w.scales.to(self.spec.act_dtype).contiguous(),
                "float_zeros": fz, "perm": perm}

    def _module(self, qweight: torch.Tensor, scales: torch.Tensor):
        key = (qweight.data_ptr(), scales.data_ptr())
        mod = self._modules.get(key)
        if mod is None:
            ipex, why = _load_ipex()
            if ipex is None:
                raise RuntimeError(f"{self.name}: {why}")
            q = ipex.llm.quantization
            method = getattr(getattr(q, "QuantMethod", None), "GPTQ_GEMM", 0)
            kwargs = {"group_size": self.spec.group_size, "g_idx": None, "quant_method": method}
            if hasattr(q, "QuantDtype"):
                kwargs["dtype"] = q.QuantDtype.INT4
            sym_zp = torch.tensor([8], dtype=torch.int8, device=qweight.device)
            mod = q.IPEXWeightOnlyQuantizedLinear.from_weight(
                qweight, scales, sym_zp, self.spec.in_features, self.spec.out_features, **kwargs)
            self._modules[key] = mod
        return mod

    def apply(self, tensors: Sequence[torch.Tensor], x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qweight, scales, float_zeros, perm = tensors
        spec = self.spec
        out_dtype = x.dtype
        x = gather_act_order(x, perm if spec.has_g_idx else None).to(spec.act_dtype).contiguous()
        y = self._module(qweight, scales)(x)
        if spec.zero_kind == ZeroKind.FLOAT:
            y = add_float_zero_correction(y, x, float_zeros, spec.group_size)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(out_dtype)
