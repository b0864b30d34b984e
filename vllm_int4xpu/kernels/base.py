"""The kernel-backend contract (modelled on vLLM's MPLinearKernel).

A backend is one class in one file:

* ``can_implement(spec) -> (ok, reason)``: decide from the frozen :class:`Int4LinearSpec` alone;
  a refusal always says why.
* ``prepare(weight) -> dict[str, Tensor]``: the one-time layout change after loading (repack,
  permute, convert zero points). The returned tensors are owned by the caller (the vLLM layer
  keeps them as parameters), in ``tensor_names`` order.
* ``apply(tensors, x2d, bias) -> y2d``: compute only, no side effects.

This package imports neither vLLM nor the format adapters (STYLE.md layering rule).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from ..weight import (Int4Weight, ZeroKind, act_order_groups_even, act_order_permutation,
                      permute_input_channels)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Int4LinearSpec:
    """What a kernel needs to know to accept a layer: shapes, zero points, dtype, device."""

    in_features: int  # K of this partition
    out_features: int  # N of this partition
    group_size: int  # == in_features for per-channel
    zero_kind: ZeroKind
    has_g_idx: bool
    act_dtype: torch.dtype
    device_type: str  # "cpu" | "cuda" | "xpu"
    # act-order groups that no input-channel permutation makes contiguous (a row-parallel shard
    # of a desc_act layer): only backends that keep g_idx as is (Int4Kernel.keeps_g_idx) can run it
    uneven_act_order: bool = False

    @classmethod
    def of(cls, w: Int4Weight, act_dtype: torch.dtype, device_type: str) -> "Int4LinearSpec":
        return cls(w.in_features, w.out_features, w.group_size, ZeroKind(w.zero_kind),
                   w.g_idx is not None, act_dtype, device_type,
                   w.g_idx is not None and not act_order_groups_even(w))

    @property
    def is_per_channel(self) -> bool:
        return self.group_size == self.in_features

    def key(self) -> str:
        """A string form, so the spec can travel through a torch custom op (made once: it is
        passed on every call)."""
        cached = self.__dict__.get("_key")
        if cached is not None:
            return cached
        key = ",".join([str(self.in_features), str(self.out_features), str(self.group_size),
                         self.zero_kind.value, str(int(self.has_g_idx)),
                         str(self.act_dtype).replace("torch.", ""), self.device_type,
                         str(int(self.uneven_act_order))])
        object.__setattr__(self, "_key", key)  # frozen: not a field, so eq/hash ignore it
        return key

    @classmethod
    def from_key(cls, key: str) -> "Int4LinearSpec":
        k, n, g, z, gi, dt, dev, uneven = key.split(",")
        return cls(int(k), int(n), int(g), ZeroKind(z), bool(int(gi)), _DTYPES[dt], dev,
                   bool(int(uneven)))


class Int4Kernel(ABC):
    """One compute backend for int4 weight-only linear layers."""

    name: ClassVar[str]
    tensor_names: ClassVar[Sequence[str]]
    # True for a backend that computes with g_idx as given (no permutation into contiguous
    # groups), so it can run act-order layers whose groups are uneven (see Int4LinearSpec)
    keeps_g_idx: ClassVar[bool] = False

    def __init__(self, spec: Int4LinearSpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: Int4LinearSpec) -> tuple[bool, Optional[str]]:
        """(True, None) or (False, 'why not')."""

    @abstractmethod
    def prepare(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        """One-time repack of the canonical weight; keys == ``tensor_names``."""

    @abstractmethod
    def apply(self, tensors: Sequence[torch.Tensor], x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = x @ W^T (+ bias) for 2-D x [M, K]; tensors in ``tensor_names`` order."""

    def op_args(self) -> Optional[tuple]:
        """Static arguments of a backend's own C++ op, which :func:`~.ops.int4_linear` then
        calls instead of the Python op; None (the default) where there is none."""
        return None


def gather_act_order(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Reorder input channels for a weight that was permuted at load (act-order)."""
    if perm is None or perm.numel() == 0:
        return x
    return x.index_select(-1, perm)


def permute_for_act_order(w: Int4Weight) -> tuple[Int4Weight, torch.Tensor]:
    """Once at load: make act-order groups contiguous. Returns (weight without g_idx, perm);
    perm is empty when the weight has no g_idx. Pair with :func:`gather_act_order` per call."""
    dev = w.qweight.device
    if w.g_idx is None:
        return w, torch.empty(0, dtype=torch.int64, device=dev)
    perm = act_order_permutation(w.g_idx).to(dev)
    return permute_input_channels(w, perm), perm
