"""The torch custom ops every backend is called through: ``torch.ops.int4xpu.linear`` (linear
layers) and ``torch.ops.int4xpu.moe`` (fused-MoE layers).

Opaque to torch.compile / vLLM's compiled mode (a fake implementation gives the output shape),
and free of Python side effects, so graphs capture it safely.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from .base import Int4Kernel, Int4LinearSpec
from .selector import load_backend


@functools.lru_cache(maxsize=None)
def _kernel(backend: str, spec_key: str) -> Int4Kernel:
    return load_backend(backend)(Int4LinearSpec.from_key(spec_key))


def _linear_impl(x: torch.Tensor, tensors: list[torch.Tensor], bias: Optional[torch.Tensor],
                 backend: str, spec_key: str) -> torch.Tensor:
    kernel = _kernel(backend, spec_key)
    if x.dim() == 2:  # vLLM's case: no views to make (a few µs per call at decode sizes)
        return kernel.apply(tensors, x if x.is_contiguous() else x.contiguous(), bias)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = kernel.apply(tensors, x2, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _linear_fake(x, tensors, bias, backend, spec_key):
    n = Int4LinearSpec.from_key(spec_key).out_features
    return x.new_empty((*x.shape[:-1], n))


# Registered through the dispatcher directly (schema + one CompositeExplicitAutograd kernel + a
# fake), as vLLM registers its own ops: ``torch.library.custom_op`` wraps every eager call in
# Python-level autograd, device dispatch and aliasing checks, which measured ~175 µs per call on
# an H100 host (benchmarks/tuning/eager_overhead.py), several times the kernel itself at decode sizes.
_LIB = torch.library.Library("int4xpu", "FRAGMENT")  # noqa: TOR901 (inference only, no autograd)
_LIB.define("linear(Tensor x, Tensor[] tensors, Tensor? bias, str backend, str spec_key) -> Tensor")
_LIB.impl("linear", _linear_impl, "CompositeExplicitAutograd")
torch.library.register_fake("int4xpu::linear", _linear_fake, lib=_LIB)


def int4_linear(x: torch.Tensor, tensors: Sequence[torch.Tensor], backend: str,
                spec: Int4LinearSpec, bias: Optional[torch.Tensor] = None,
                op_args: Optional[tuple] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) through the chosen backend's prepared tensors. ``op_args``: the
    ``cpu_native`` layer's static arguments of its own C++ op (``CpuNativeKernel.op_args``),
    which then takes the call without the Python op."""
    if op_args is not None:
        return torch.ops.int4xpu.cpu_native_mm(x, *tensors, bias, *op_args)
    return torch.ops.int4xpu.linear(x, list(tensors), bias, backend, spec.key())


@functools.lru_cache(maxsize=None)
def _moe_kernel(backend: str, spec_key: str):
    from .moe_base import Int4MoESpec
    return load_backend(backend, True)(Int4MoESpec.from_key(spec_key))


def _moe_impl(x: torch.Tensor, tensors: list[torch.Tensor], topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, backend: str, spec_key: str) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = _moe_kernel(backend, spec_key).apply(tensors, x2, topk_weights, topk_ids)
    return y.reshape(x.shape)


def _moe_fake(x, tensors, topk_weights, topk_ids, backend, spec_key):
    return torch.empty_like(x)


_LIB.define("moe(Tensor x, Tensor[] tensors, Tensor topk_weights, Tensor topk_ids, str backend, "
            "str spec_key) -> Tensor")
_LIB.impl("moe", _moe_impl, "CompositeExplicitAutograd")
torch.library.register_fake("int4xpu::moe", _moe_fake, lib=_LIB)


def int4_moe(x: torch.Tensor, tensors: Sequence[torch.Tensor], topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, backend: str, spec) -> torch.Tensor:
    """The fused-MoE output [M, H] through the chosen MoE backend's prepared tensors."""
    return torch.ops.int4xpu.moe(x, list(tensors), topk_weights, topk_ids, backend, spec.key())
