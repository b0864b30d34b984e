"""int4 GEMM kernels on the canonical weight; no vLLM and no format adapters imported here."""

from .base import Int4Kernel, Int4LinearSpec, gather_act_order
from .moe_base import Int4MoEKernel, Int4MoESpec
from .selector import (BACKENDS, ENV_BACKEND, ENV_MOE_BACKEND, MOE_BACKENDS, MOE_ORDER, ORDER,
                       check_backend, load_backend, select_kernel, select_moe_kernel)

__all__ = ["Int4Kernel", "Int4LinearSpec", "Int4MoEKernel", "Int4MoESpec", "gather_act_order",
           "BACKENDS", "ENV_BACKEND", "ENV_MOE_BACKEND", "MOE_BACKENDS", "MOE_ORDER", "ORDER",
           "check_backend", "load_backend", "select_kernel", "select_moe_kernel", "Int4Linear",
           "Int4MoE"]


class Int4Linear:
    """A prepared int4 linear outside vLLM (benchmarks, selfcheck, tests): select, prepare, call."""

    def __init__(self, weight, act_dtype, device_type: str, backend: str | None = None):
        spec = Int4LinearSpec.of(weight, act_dtype, device_type)
        cls = select_kernel(spec, forced=backend)
        self.spec, self.backend = spec, cls.name
        prepared = cls(spec).prepare(weight)
        self.tensors = [prepared[n] for n in cls.tensor_names]

    def __call__(self, x, bias=None):
        from .ops import int4_linear
        return int4_linear(x, self.tensors, self.backend, self.spec, bias)


class Int4MoE:
    """A prepared int4 fused-MoE layer outside vLLM (benchmarks, selfcheck, tests)."""

    def __init__(self, w13, w2, act_dtype, device_type: str, backend: str | None = None,
                 activation: str = "silu"):
        spec = Int4MoESpec.of(w13, w2, act_dtype, device_type, activation)
        cls = select_moe_kernel(spec, forced=backend)
        self.spec, self.backend = spec, cls.name
        prepared = cls(spec).prepare(w13, w2)
        self.tensors = [prepared[n] for n in cls.tensor_names]

    def __call__(self, x, topk_weights, topk_ids):
        from .ops import int4_moe
        return int4_moe(x, self.tensors, topk_weights, topk_ids, self.backend, self.spec)
