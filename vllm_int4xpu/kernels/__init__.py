"""int4 GEMM kernels on the canonical weight; no vLLM and no format adapters imported here."""

from .base import Int4Kernel, Int4LinearSpec, gather_act_order
from .selector import BACKENDS, ENV_BACKEND, ORDER, check_backend, load_backend, select_kernel

__all__ = ["Int4Kernel", "Int4LinearSpec", "gather_act_order", "BACKENDS", "ENV_BACKEND", "ORDER",
           "check_backend", "load_backend", "select_kernel", "Int4Linear"]


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
