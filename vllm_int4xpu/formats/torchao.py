"""torchao int4 weight-only checkpoints saved through transformers (``quant_method: torchao``).

config.json ``quantization_config``::

    {"quant_method": "torchao", "modules_to_not_convert": [...],
     "quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_version": 2,
                                "_data": {"group_size": 128,
                                          "int4_packing_format": "plain_int32" | "plain" | ...}}}}

transformers flattens each torchao tensor subclass into plain tensors named
``<module>._weight_<field>`` (and records the subclass in the safetensors metadata). Per layout
(N = out, K = in, G = K/g):

* ``plain_int32`` (Int4PlainInt32Tensor, the XPU/oneDNN layout)::

    _weight_qdata       int32 [N, K/8]  codes 0..15, low nibble first: the canonical qweight
    _weight_scale       float [G, N]
    _weight_zero_point  int8  [G, N]    w = (q - zp) * s

* ``plain`` (Int4Tensor)::

    _weight_qdata       int8/uint8 [N, K/2]  signed codes -8..7, element 2j in the low nibble
    _weight_scale       bf16 [G, N]
    _weight_zero_point  bf16 [G, N]          w = q_signed * s + z  (= (q - 8) * s + z)

* ``tile_packed_to_4d`` (CUDA tinygemm tiles), ``preshuffled`` and the v1 ``int4_weight_only``
  string configs are refused with a message saying which layout to re-save in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import Int4FormatError
from ..weight import PACK_FACTOR, Int4Weight, ZeroKind, pack_int4
from . import _packing as P
from .base import CheckpointFormat, LayerGeometry, TensorSpec

SUPPORTED_LAYOUTS = ("plain_int32", "plain")
INT4_CONFIGS = ("Int4WeightOnlyConfig",)


def _bad(msg: str, key: str, expected: Any, found: Any) -> Int4FormatError:
    return Int4FormatError(f"torchao: {msg}", file="config.json", tensor=f"quantization_config.{key}",
                           expected=expected, found=found)


def _quant_type(cfg: dict[str, Any]) -> dict[str, Any]:
    qt = cfg.get("quant_type")
    if isinstance(qt, str):
        raise _bad("torchao v1 string configs (pickled AffineQuantizedTensor) are not supported; "
                   "re-save with Int4WeightOnlyConfig(int4_packing_format='plain_int32')",
                   "quant_type", "an Int4WeightOnlyConfig dict", qt)
    if not isinstance(qt, dict) or not qt:
        raise _bad("missing quant_type", "quant_type", "an Int4WeightOnlyConfig dict", qt)
    if "_type" in qt:
        return qt
    configs = {k: v for k, v in qt.items() if isinstance(v, dict)}
    distinct = {json.dumps(v, sort_keys=True) for v in configs.values()}
    if len(distinct) != 1:
        raise _bad("per-module torchao configs are not supported", "quant_type",
                   "one config (key 'default')", list(qt))
    return next(iter(configs.values()))


def unpack_plain_signed(qdata: torch.Tensor) -> torch.Tensor:
    """torchao ``plain`` int8 [N, K/2] (two signed nibbles, even k low) -> codes 0..15 [N, K]."""
    b = qdata.view(torch.uint8) if qdata.dtype == torch.int8 else qdata
    lo, hi = b & 0xF, (b >> 4) & 0xF
    nib = torch.stack([lo, hi], dim=-1).reshape(b.shape[0], -1)
    return nib ^ 0x8  # signed v -> v + 8 (two's complement nibble with the sign bit flipped)


@dataclass
class TorchAOFormat(CheckpointFormat):
    name: ClassVar[str] = "torchao"
    layout: str = "plain_int32"

    @classmethod
    def matches(cls, cfg: dict[str, Any]) -> bool:
        return str(cfg.get("quant_method", "")).lower() == "torchao"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "TorchAOFormat":
        qt = _quant_type(cfg)
        if qt.get("_type") not in INT4_CONFIGS:
            raise _bad("only int4 weight-only torchao configs are supported", "quant_type._type",
                       list(INT4_CONFIGS), qt.get("_type"))
        data = qt.get("_data") or {}
        layout = str(data.get("int4_packing_format") or data.get("packing_format") or "plain")
        layout = layout.split(".")[-1].lower()  # tolerate enum reprs like Int4PackingFormat.PLAIN
        if layout == "tile_packed_to_4d":
            raise _bad("the tile_packed_to_4d layout is CUDA tinygemm's tiled format and is not "
                       "portable; re-save the model with Int4WeightOnlyConfig("
                       "int4_packing_format='plain_int32')", "quant_type._data.int4_packing_format",
                       list(SUPPORTED_LAYOUTS), layout)
        if layout not in SUPPORTED_LAYOUTS:
            raise _bad("unsupported int4 packing format", "quant_type._data.int4_packing_format",
                       list(SUPPORTED_LAYOUTS), layout)
        g = data.get("group_size", 128)
        if not isinstance(g, int) or g <= 0:
            raise _bad("bad group size", "quant_type._data.group_size", "a positive int", g)
        return cls(bits=4, group_size=g,
                   zero_kind=ZeroKind.INT if layout == "plain_int32" else ZeroKind.FLOAT,
                   skip_modules=list(cfg.get("modules_to_not_convert") or []), raw=dict(cfg),
                   layout=layout)

    def _groups(self, geo: LayerGeometry) -> tuple[int, int]:
        K, g = geo.in_per_partition, self.group_size
        if K % g:
            raise Int4FormatError("torchao: group size must divide the partition's in_features",
                                  tensor="_weight_scale", expected=f"a divisor of {K}", found=g)
        return g, K // g

    def tensor_specs(self, geo: LayerGeometry) -> list[TensorSpec]:
        K, N = geo.in_per_partition, geo.out_per_partition
        _, groups = self._groups(geo)
        if self.layout == "plain_int32":
            return [
                TensorSpec("_weight_qdata", (N, K // PACK_FACTOR), torch.int32, output_dim=0,
                           input_dim=1, packed_dim=1, packed_factor=PACK_FACTOR),
                TensorSpec("_weight_scale", (groups, N), torch.float32, output_dim=1, input_dim=0),
                TensorSpec("_weight_zero_point", (groups, N), torch.int8, output_dim=1, input_dim=0),
            ]
        return [
            TensorSpec("_weight_qdata", (N, K // 2), torch.int8, output_dim=0, input_dim=1,
                       packed_dim=1, packed_factor=2),
            TensorSpec("_weight_scale", (groups, N), torch.float32, output_dim=1, input_dim=0),
            TensorSpec("_weight_zero_point", (groups, N), torch.float32, output_dim=1, input_dim=0),
        ]

    def to_canonical(self, t: dict[str, torch.Tensor], geo: LayerGeometry) -> Int4Weight:
        K, N = geo.in_per_partition, geo.out_per_partition
        g, groups = self._groups(geo)
        f = self.name
        s = P.expect_float(P.expect(t.get("_weight_scale"), "_weight_scale", (groups, N), fmt=f),
                           "_weight_scale", fmt=f)
        zp = P.expect(t.get("_weight_zero_point"), "_weight_zero_point", (groups, N), fmt=f)
        if self.layout == "plain_int32":
            qweight = P.as_int32(P.expect(t.get("_weight_qdata"), "_weight_qdata",
                                          (N, K // PACK_FACTOR), fmt=f))
            if zp.is_floating_point():
                raise Int4FormatError("torchao: plain_int32 zero points must be integers",
                                      tensor="_weight_zero_point", expected="torch.int8",
                                      found=str(zp.dtype))
            if zp.numel() and (int(zp.min()) < 0 or int(zp.max()) > 15):
                raise Int4FormatError("torchao: zero points out of range",
                                      tensor="_weight_zero_point", expected="0..15",
                                      found=f"{int(zp.min())}..{int(zp.max())}")
            return Int4Weight(qweight=qweight, scales=s, zeros=zp.to(torch.int8),
                              zero_kind=ZeroKind.INT, group_size=g, in_features=K, out_features=N)
        qdata = P.expect(t.get("_weight_qdata"), "_weight_qdata", (N, K // 2), fmt=f)
        if qdata.dtype not in (torch.int8, torch.uint8):
            raise Int4FormatError("torchao: plain qdata must be int8", tensor="_weight_qdata",
                                  expected="torch.int8", found=str(qdata.dtype))
        z = P.expect_float(zp, "_weight_zero_point", fmt=f)
        codes = unpack_plain_signed(qdata)
        return Int4Weight(qweight=pack_int4(codes.to(torch.int32)), scales=s, zeros=z.float(),
                          zero_kind=ZeroKind.FLOAT, group_size=g, in_features=K, out_features=N)
