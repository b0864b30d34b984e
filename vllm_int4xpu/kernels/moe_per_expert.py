"""MoE backends that run a linear backend per expert (see :class:`.moe_base.PerExpertMoEKernel`).

* ``reference``: dequantize + matmul per expert, any layout (the twin of
  :func:`vllm_int4xpu.weight.reference_moe`, the test oracle);
* ``cpu_native``: the project's own int4 CPU kernel per expert (its direct/dense rule);
* ``cpu``: torch's int4 CPU GEMM per expert, dequantize + dense GEMM for experts that receive many
  tokens (the linear ``cpu`` backend's own rule);
* ``xpu_onednn``: oneDNN int4 GEMMs per expert on Intel GPUs, float zero points through the exact
  correction of the linear ``xpu_onednn`` backend.
"""

from __future__ import annotations

from .cpu import CpuKernel
from .cpu_native import CpuNativeKernel
from .moe_base import per_expert
from .reference import ReferenceKernel
from .xpu_onednn import XpuOneDnnKernel

ReferenceMoEKernel = per_expert(ReferenceKernel)
CpuMoEKernel = per_expert(CpuKernel)
CpuNativeMoEKernel = per_expert(CpuNativeKernel)
XpuOneDnnMoEKernel = per_expert(XpuOneDnnKernel)
