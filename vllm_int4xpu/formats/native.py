"""The project's own checkpoint format ``int4xpu`` (written by ``vllm-int4xpu quantize``).

config.json::

    "quantization_config": {"quant_method": "int4xpu", "bits": 4, "group_size": 64,
                            "zero_point": "int" | "float" | "none", "act_order": false,
                            "modules_to_not_convert": ["lm_head"], "format_version": 1}

Per quantized linear ``<p>`` (the canonical layout, so loading is a copy):

* ``<p>.qweight`` int32 [N, K/8]  (low nibble first along K)
* ``<p>.scales``  float [K/g, N]
* ``<p>.qzeros``  int8 [K/g, N] in 0..15        (zero_point "int")
* ``<p>.zeros``   float [K/g, N]                (zero_point "float": w = (q - 8) * s + z)
* ``<p>.g_idx``   int32 [K]                     (act_order true)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import Int4FormatError
from ..weight import PACK_FACTOR, Int4Weight, ZeroKind
from .base import ACT_DTYPE, CheckpointFormat, LayerGeometry, TensorSpec, check_bits, check_group_size

QUANT_METHOD = "int4xpu"
FORMAT_VERSION = 1


@dataclass
class NativeFormat(CheckpointFormat):
    name = "int4xpu"

    @classmethod
    def matches(cls, hf_quant_cfg: dict[str, Any]) -> bool:
        return str(hf_quant_cfg.get("quant_method", "")).lower() == QUANT_METHOD

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "NativeFormat":
        bits = check_bits(cfg.get("bits"), "int4xpu")
        g = check_group_size(cfg.get("group_size"), "int4xpu")
        zp = cfg.get("zero_point", "int")
        try:
            zero_kind = ZeroKind(zp)
        except ValueError:
            raise Int4FormatError("int4xpu: unknown zero_point kind", file="config.json",
                                  tensor="quantization_config.zero_point",
                                  expected=[z.value for z in ZeroKind], found=zp) from None
        return cls(bits=bits, group_size=g, zero_kind=zero_kind,
                   act_order=bool(cfg.get("act_order", False)),
                   skip_modules=list(cfg.get("modules_to_not_convert") or []), raw=dict(cfg))

    def to_hf_config(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "bits": 4, "group_size": self.group_size,
                "zero_point": self.zero_kind.value, "act_order": self.act_order,
                "modules_to_not_convert": list(self.skip_modules),
                "format_version": FORMAT_VERSION}

    def tensor_specs(self, geo: LayerGeometry) -> list[TensorSpec]:
        K, N = geo.in_per_partition, geo.out_per_partition
        if K % PACK_FACTOR:
            raise Int4FormatError("int4xpu: in_features must be a multiple of 8", tensor="qweight",
                                  expected="K % 8 == 0", found=K)
        g, groups, in_dim = self.scale_groups(geo)
        specs = [
            TensorSpec("qweight", (N, K // PACK_FACTOR), torch.int32, output_dim=0, input_dim=1,
                       packed_dim=1, packed_factor=PACK_FACTOR),
            TensorSpec("scales", (groups, N), ACT_DTYPE, output_dim=1, input_dim=in_dim),
        ]
        if self.zero_kind == ZeroKind.INT:
            specs.append(TensorSpec("qzeros", (groups, N), torch.int8, output_dim=1, input_dim=in_dim))
        elif self.zero_kind == ZeroKind.FLOAT:
            specs.append(TensorSpec("zeros", (groups, N), torch.float32, output_dim=1, input_dim=in_dim))
        if self.act_order:
            specs.append(TensorSpec("g_idx", (K,), torch.int32, input_dim=0))
        return specs

    def to_canonical(self, t: dict[str, torch.Tensor], geo: LayerGeometry) -> Int4Weight:
        zeros = t.get("qzeros") if self.zero_kind == ZeroKind.INT else t.get("zeros")
        return Int4Weight(qweight=t["qweight"], scales=t["scales"], zeros=zeros,
                          zero_kind=self.zero_kind, group_size=self.group_size_for(geo),
                          in_features=geo.in_per_partition, out_features=geo.out_per_partition,
                          g_idx=t.get("g_idx"))

    @staticmethod
    def layer_tensors(w: Int4Weight) -> dict[str, torch.Tensor]:
        """The on-disk tensors of one layer (suffix -> tensor), for writers."""
        out = {"qweight": w.qweight, "scales": w.scales}
        if w.zero_kind == ZeroKind.INT:
            out["qzeros"] = w.zeros
        elif w.zero_kind == ZeroKind.FLOAT:
            out["zeros"] = w.zeros
        if w.g_idx is not None:
            out["g_idx"] = w.g_idx
        return out
