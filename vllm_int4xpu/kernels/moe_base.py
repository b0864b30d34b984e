"""The int4 mixture-of-experts kernel contract, and backends built from a linear backend.

A MoE backend computes one fused-MoE layer: for tokens x [M, H] routed to experts ``topk_ids``
[M, k] with router weights ``topk_weights`` [M, k],

    y[m] = Σ_j topk_weights[m, j] · W2_e( act( W13_e x[m] ) ),   e = topk_ids[m, j]

where W13_e [2I, H] is the expert's gate (rows 0..I-1) and up (rows I..2I-1) projection, act is
``act(gate) * up`` and W2_e [H, I] is its down projection; both are int4 (:class:`Int4Experts`).

Like the linear backends (``base.py``) a MoE backend is one class: ``can_implement(spec)`` with a
reason, ``prepare(w13, w2)`` once after loading, ``apply(tensors, x, topk_weights, topk_ids)``
computing only. :class:`PerExpertMoEKernel` turns any linear backend into a MoE backend that
gathers each expert's tokens and calls the linear backend twice per expert (reference, cpu,
xpu_onednn); the Triton backend is one fused launch for all experts (``moe_triton.py``).
No vLLM and no format adapters here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from ..weight import (Int4Experts, ZeroKind, act_order_groups_even, moe_activation)
from .base import Int4Kernel, Int4LinearSpec, _DTYPES

ACTIVATIONS = ("silu", "gelu")


@dataclass(frozen=True)
class Int4MoESpec:
    """What a MoE kernel needs to know to accept a layer (one tensor-parallel partition)."""

    num_experts: int
    hidden: int  # H: K of gate_up, N of down
    intermediate: int  # I of this partition: gate_up has N = 2I, down has K = I
    group_w13: int  # group size of gate_up (== hidden for per-channel)
    group_w2: int  # group size of down (== intermediate for per-channel)
    zero_kind: ZeroKind
    has_g_idx: bool
    act_dtype: torch.dtype
    device_type: str
    activation: str = "silu"
    uneven_act_order: bool = False  # act-order groups no permutation makes contiguous (TP shard)

    @classmethod
    def of(cls, w13: Int4Experts, w2: Int4Experts, act_dtype: torch.dtype, device_type: str,
           activation: str = "silu") -> "Int4MoESpec":
        uneven = any(w.g_idx is not None and not act_order_groups_even(w)
                     for s in (w13, w2) for w in s.experts())
        return cls(w13.num_experts, w13.in_features, w2.in_features, w13.group_size,
                   w2.group_size, ZeroKind(w13.zero_kind),
                   w13.g_idx is not None or w2.g_idx is not None, act_dtype, device_type,
                   activation, uneven)

    def linear_specs(self) -> tuple[Int4LinearSpec, Int4LinearSpec]:
        """The per-expert linear specs of gate_up and down."""
        H, I = self.hidden, self.intermediate
        common = dict(zero_kind=self.zero_kind, has_g_idx=self.has_g_idx,
                      act_dtype=self.act_dtype, device_type=self.device_type,
                      uneven_act_order=self.uneven_act_order)
        return (Int4LinearSpec(H, 2 * I, self.group_w13, **common),
                Int4LinearSpec(I, H, self.group_w2, **common))

    def key(self) -> str:
        return ",".join([str(self.num_experts), str(self.hidden), str(self.intermediate),
                         str(self.group_w13), str(self.group_w2), self.zero_kind.value,
                         str(int(self.has_g_idx)), str(self.act_dtype).replace("torch.", ""),
                         self.device_type, self.activation, str(int(self.uneven_act_order))])

    @classmethod
    def from_key(cls, key: str) -> "Int4MoESpec":
        e, h, i, g13, g2, z, gi, dt, dev, act, uneven = key.split(",")
        return cls(int(e), int(h), int(i), int(g13), int(g2), ZeroKind(z), bool(int(gi)),
                   _DTYPES[dt], dev, act, bool(int(uneven)))


class Int4MoEKernel(ABC):
    """One compute backend for int4 fused-MoE layers."""

    name: ClassVar[str]
    tensor_names: ClassVar[Sequence[str]]

    def __init__(self, spec: Int4MoESpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: Int4MoESpec) -> tuple[bool, Optional[str]]:
        """(True, None) or (False, 'why not')."""

    @abstractmethod
    def prepare(self, w13: Int4Experts, w2: Int4Experts) -> dict[str, torch.Tensor]:
        """One-time repack of the stacked canonical weights; keys == ``tensor_names``."""

    @abstractmethod
    def apply(self, tensors: Sequence[torch.Tensor], x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """y [M, H] (x's dtype) for x [M, H], topk_weights [M, k] (float), topk_ids [M, k]."""


def check_moe_spec(spec: Int4MoESpec) -> Optional[str]:
    """Why no backend can run ``spec`` (None when it is well formed)."""
    if spec.activation not in ACTIVATIONS:
        return f"activation {spec.activation!r} not in {ACTIVATIONS}"
    return None


class PerExpertMoEKernel(Int4MoEKernel):
    """A MoE backend from a linear backend: per expert, gather its tokens, run gate_up and down
    through the linear backend, weight by the router and add. The expert loop reads the routing
    on the host (one sync per call), so it is not for CUDA graphs; the fused Triton backend is."""

    linear: ClassVar[type[Int4Kernel]]

    @classmethod
    def can_implement(cls, spec: Int4MoESpec):
        why = check_moe_spec(spec)
        if why:
            return False, why
        s13, s2 = spec.linear_specs()
        if spec.uneven_act_order and not cls.linear.keeps_g_idx:
            return False, "act-order groups split unevenly across tensor-parallel ranks"
        for part, s in (("gate_up", s13), ("down", s2)):
            ok, why = cls.linear.can_implement(s)
            if not ok:
                return False, f"{part}: {why}"
        return True, None

    def __init__(self, spec: Int4MoESpec):
        super().__init__(spec)
        s13, s2 = spec.linear_specs()
        self.k13, self.k2 = self.linear(s13), self.linear(s2)

    @property
    def _n13(self) -> int:
        return len(self.linear.tensor_names)

    def prepare(self, w13: Int4Experts, w2: Int4Experts) -> dict[str, torch.Tensor]:
        out = {}
        for tag, kern, stack in (("w13", self.k13, w13), ("w2", self.k2, w2)):
            per = [kern.prepare(w) for w in stack.experts()]
            for n in self.linear.tensor_names:
                out[f"{tag}_{n}"] = torch.stack([p[n] for p in per]).contiguous()
        return out

    def apply(self, tensors, x, topk_weights, topk_ids):
        n = self._n13
        t13, t2 = tensors[:n], tensors[n:]
        M, k = topk_ids.shape
        flat = topk_ids.reshape(-1).to(torch.int64)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.spec.num_experts).tolist()
        weights = topk_weights.reshape(-1).to(torch.float32)
        y = torch.zeros(M, self.spec.hidden, dtype=torch.float32, device=x.device)
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            slots = order[start:start + c]
            start += c
            rows = slots // k
            h = self.k13.apply([t[e] for t in t13], x.index_select(0, rows))
            o = self.k2.apply([t[e] for t in t2], moe_activation(h, self.spec.activation))
            y.index_add_(0, rows, o.to(torch.float32) * weights[slots, None])
        return y.to(x.dtype)


def per_expert(linear_cls: type[Int4Kernel]) -> type[PerExpertMoEKernel]:
    """The per-expert MoE backend of a linear backend (same name)."""
    return type(f"PerExpert{linear_cls.__name__}", (PerExpertMoEKernel,),
                {"name": linear_cls.name, "linear": linear_cls,
                 "tensor_names": tuple(f"w13_{n}" for n in linear_cls.tensor_names)
                 + tuple(f"w2_{n}" for n in linear_cls.tensor_names)})
