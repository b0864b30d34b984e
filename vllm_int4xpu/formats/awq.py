"""AWQ GEMM checkpoints (``quant_method: awq``, ``version: gemm``; AutoAWQ, AutoRound's AWQ export).

config.json ``quantization_config``: ``bits`` or ``w_bit``, ``group_size`` or ``q_group_size``,
``zero_point``, ``version``, ``modules_to_not_convert``.

Per quantized linear ``<p>`` (K = in, N = out, G = K/g)::

    <p>.qweight  int32 [K, N/8]  codes packed along N, nibble i holds column (0,2,4,6,1,3,5,7)[i]
    <p>.qzeros   int32 [G, N/8]  zero points, same packing, stored as is (no -1)
    <p>.scales   fp16  [G, N]

w[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]. Conversion: undo the nibble order, transpose
the codes to [N, K] and repack along K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import Int4FormatError
from ..weight import PACK_FACTOR, Int4Weight, ZeroKind
from . import _packing as P
from .base import ACT_DTYPE, CheckpointFormat, LayerGeometry, TensorSpec, check_bits, check_group_size


@dataclass
class AWQLayout(CheckpointFormat):
    """The AWQ GEMM tensor layout (shared with AutoRound's ``auto_round:auto_awq``)."""

    name: ClassVar[str] = "awq"

    def _groups(self, geo: LayerGeometry) -> tuple[int, int, int | None]:
        return self.scale_groups(geo)  # AWQ has no act-order

    def tensor_specs(self, geo: LayerGeometry) -> list[TensorSpec]:
        K, N = geo.in_per_partition, geo.out_per_partition
        if N % PACK_FACTOR or K % PACK_FACTOR:
            raise Int4FormatError(f"{self.name}: in/out features must be multiples of 8",
                                  tensor="qweight", expected="K % 8 == 0 and N % 8 == 0",
                                  found=[K, N])
        _, groups, in_dim = self._groups(geo)
        return [
            TensorSpec("qweight", (K, N // PACK_FACTOR), torch.int32, output_dim=1, input_dim=0,
                       packed_dim=1, packed_factor=PACK_FACTOR),
            TensorSpec("scales", (groups, N), ACT_DTYPE, output_dim=1, input_dim=in_dim),
            TensorSpec("qzeros", (groups, N // PACK_FACTOR), torch.int32, output_dim=1,
                       input_dim=in_dim, packed_dim=1, packed_factor=PACK_FACTOR,
                       optional=self.zero_kind == ZeroKind.NONE),
        ]

    def to_canonical(self, t: dict[str, torch.Tensor], geo: LayerGeometry) -> Int4Weight:
        K, N = geo.in_per_partition, geo.out_per_partition
        g, groups, _ = self._groups(geo)
        f = self.name
        qweight = P.expect(t.get("qweight"), "qweight", (K, N // PACK_FACTOR), fmt=f)
        codes = P.unpack_awq(qweight)  # [K, N]
        scales = P.expect_float(P.expect(t.get("scales"), "scales", (groups, N), fmt=f), "scales", fmt=f)
        zeros, zero_kind = None, ZeroKind.NONE
        if t.get("qzeros") is not None:
            qz = P.as_int32(P.expect(t["qzeros"], "qzeros", (groups, N // PACK_FACTOR), fmt=f))
            zeros = P.unpack_awq(qz).to(torch.int8)
            zero_kind = ZeroKind.INT
            if bool(torch.all(zeros == 8)):
                zeros, zero_kind = None, ZeroKind.NONE
        return Int4Weight(qweight=P.codes_to_canonical(codes.t()), scales=scales, zeros=zeros,
                          zero_kind=zero_kind, group_size=g, in_features=K, out_features=N)


@dataclass
class AWQFormat(AWQLayout):
    name: ClassVar[str] = "awq"

    @classmethod
    def matches(cls, cfg: dict[str, Any]) -> bool:
        return str(cfg.get("quant_method", "")).lower() == "awq"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "AWQFormat":
        bits = check_bits(cfg.get("bits", cfg.get("w_bit")), "awq")
        g = check_group_size(cfg.get("group_size", cfg.get("q_group_size", 128)), "awq")
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise Int4FormatError("awq: only the GEMM packing is supported", file="config.json",
                                  tensor="quantization_config.version", expected="gemm",
                                  found=version)
        zp = bool(cfg.get("zero_point", True))
        return cls(bits=bits, group_size=g, zero_kind=ZeroKind.INT if zp else ZeroKind.NONE,
                   skip_modules=list(cfg.get("modules_to_not_convert") or []), raw=dict(cfg))
