"""HQQ checkpoints saved through transformers' ``HqqConfig`` (``quant_method: hqq``).

config.json ``quantization_config``::

    {"quant_method": "hqq", "skip_modules": ["lm_head"],
     "quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64, "axis": 1,
                                              "view_as_float": false, ...},
                      "scale_quant_params": null, "zero_quant_params": null}}

Per quantized linear ``<p>`` (N = out, K = in, g = group size, R = N*K/g rows of g values)::

    <p>.W_q    uint8 [R/2, g]   4-bit codes: rows r < R/2 in the high nibble, rows r >= R/2 in
                                the low nibble (``W_q[:R/2] << 4 | W_q[R/2:]``); row r is group
                                r % (K/g) of output channel r // (K/g)
    <p>.scale  float [R, 1]
    <p>.zero   float [R, 1]     w = (q - zero) * scale
    <p>.shape, .nbits, .group_size, .axis, .packing, ... (metadata, dropped at load)

Why a load hook: the row-split packing pairs output channel n with channel n + N/2 in one byte,
so no slice of ``W_q`` along dim 0 is one tensor-parallel shard. :meth:`prepare_loaded` turns
each whole checkpoint tensor into the canonical layout (codes [N, K/8] int32, scale/zero
[K/g, N]) before vLLM's loader shards it, so the parameters use vLLM's ordinary column/row
sharding. Float zero points become the canonical float form z' = (8 - zero) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import Int4FormatError
from ..weight import PACK_FACTOR, Int4Weight, ZeroKind, pack_int4
from . import _packing as P
from .base import CheckpointFormat, LayerGeometry, TensorSpec, check_bits, check_group_size

# Per-layer metadata tensors transformers writes next to W_q/scale/zero (not weights).
HQQ_META_SUFFIXES = (".nbits", ".group_size", ".shape", ".axis", ".packing",
                     ".unpack_view_dtype", ".view_as_float", ".quant_scale", ".quant_zero",
                     ".compute_dtype", ".offload_meta", ".encoded_state_dict",
                     ".stores_quant_config", ".channel_wise", ".optimize", ".round_zero")


def _bad(msg: str, key: str, expected: Any, found: Any) -> Int4FormatError:
    return Int4FormatError(f"hqq: {msg}", file="config.json", tensor=f"quantization_config.{key}",
                           expected=expected, found=found)


def unpack_hqq_rows(w_q: torch.Tensor) -> torch.Tensor:
    """HQQ 4-bit uint8 [R/2, g] -> codes uint8 [R, g] (high nibbles first, then low)."""
    return torch.cat([(w_q >> 4) & 0xF, w_q & 0xF], dim=0)


@dataclass
class HQQFormat(CheckpointFormat):
    name: ClassVar[str] = "hqq"
    dropped_suffixes: ClassVar[tuple[str, ...]] = HQQ_META_SUFFIXES

    @classmethod
    def matches(cls, cfg: dict[str, Any]) -> bool:
        return str(cfg.get("quant_method", "")).lower() == "hqq"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "HQQFormat":
        qc = cfg.get("quant_config") or {}
        if "weight_quant_params" not in qc and qc:
            # transformers may store one config per module kind: they must all agree.
            per = {k: v for k, v in qc.items() if isinstance(v, dict)}
            distinct = {json_key(v.get("weight_quant_params")) for v in per.values()}
            if len(distinct) != 1:
                raise _bad("per-module HQQ settings differ", "quant_config", "one setting", per)
            qc = next(iter(per.values()))
        wp = qc.get("weight_quant_params") or {}
        bits = check_bits(wp.get("nbits"), "hqq")
        if wp.get("axis", 1) != 1:
            raise _bad("only axis 1 (groups along the input dim) is supported",
                       "quant_config.weight_quant_params.axis", 1, wp.get("axis"))
        if wp.get("view_as_float"):
            raise _bad("view_as_float checkpoints are not supported",
                       "quant_config.weight_quant_params.view_as_float", False, True)
        if qc.get("scale_quant_params") or qc.get("zero_quant_params"):
            raise _bad("quantized scales/zero points are not supported",
                       "quant_config.zero_quant_params", None,
                       qc.get("zero_quant_params") or qc.get("scale_quant_params"))
        g = wp.get("group_size")
        # None/0: one group per row (per-channel); otherwise a positive int, as hqq writes it
        g = -1 if g is None or (g == 0 and type(g) is int) else check_group_size(g, "hqq")
        return cls(bits=bits, group_size=g, zero_kind=ZeroKind.FLOAT,
                   skip_modules=list(cfg.get("skip_modules") or []), raw=dict(cfg))

    # ------------------------------------------------------------------ loading
    def prepare_loaded(self, name: str, tensor: torch.Tensor, geo: LayerGeometry) -> torch.Tensor:
        """Whole checkpoint tensor -> canonical layout (before vLLM shards it)."""
        K = geo.in_full
        g = K if self.group_size == -1 else self.group_size
        if name == "W_q":
            if tensor.dtype != torch.uint8 or tensor.dim() != 2 or tensor.shape[1] != g:
                raise Int4FormatError("hqq: W_q must be uint8 [N*K/(2g), g]", tensor="W_q",
                                      expected=f"uint8 [*, {g}]",
                                      found=f"{tensor.dtype} {list(tensor.shape)}")
            codes = unpack_hqq_rows(tensor)
            if codes.numel() % K:
                raise Int4FormatError("hqq: W_q size is not a multiple of in_features",
                                      tensor="W_q", expected=f"N*{K} codes", found=codes.numel())
            return pack_int4(codes.reshape(-1, K).to(torch.int32))
        if name in ("scale", "zero"):
            if tensor.numel() % (K // g) or tensor.dim() != 2 or tensor.shape[1] != 1:
                raise Int4FormatError(f"hqq: {name} must be [N*K/g, 1]", tensor=name,
                                      expected=f"[N*{K // g}, 1]", found=list(tensor.shape))
            return tensor.reshape(-1, K // g).t().contiguous()
        return tensor

    def _groups(self, geo: LayerGeometry) -> tuple[int, int, int | None]:
        K = geo.in_per_partition
        if self.group_size == -1:
            if geo.row_parallel:
                raise Int4FormatError("hqq: per-channel weights cannot be split along in_features",
                                      tensor="scale", expected="tensor parallel column layers only",
                                      found="row-parallel")
            return K, 1, None
        g = self.group_size
        if K % g:
            raise Int4FormatError("hqq: group size must divide the partition's in_features",
                                  tensor="scale", expected=f"a divisor of {K}", found=g)
        return g, K // g, 0

    def tensor_specs(self, geo: LayerGeometry) -> list[TensorSpec]:
        # Shapes are those *after* prepare_loaded (canonical layout).
        K, N = geo.in_per_partition, geo.out_per_partition
        _, groups, in_dim = self._groups(geo)
        return [
            TensorSpec("W_q", (N, K // PACK_FACTOR), torch.int32, output_dim=0, input_dim=1,
                       packed_dim=1, packed_factor=PACK_FACTOR),
            TensorSpec("scale", (groups, N), torch.float32, output_dim=1, input_dim=in_dim),
            TensorSpec("zero", (groups, N), torch.float32, output_dim=1, input_dim=in_dim),
        ]

    def to_canonical(self, t: dict[str, torch.Tensor], geo: LayerGeometry) -> Int4Weight:
        K, N = geo.in_per_partition, geo.out_per_partition
        g, groups, _ = self._groups(geo)
        f = self.name
        qweight = P.expect(t.get("W_q"), "W_q", (N, K // PACK_FACTOR), torch.int32, fmt=f)
        s = P.expect_float(P.expect(t.get("scale"), "scale", (groups, N), fmt=f), "scale", fmt=f)
        z = P.expect_float(P.expect(t.get("zero"), "zero", (groups, N), fmt=f), "zero", fmt=f)
        s32, z32 = s.to(torch.float32), z.to(torch.float32)
        return Int4Weight(qweight=qweight, scales=s32, zeros=(8.0 - z32) * s32,
                          zero_kind=ZeroKind.FLOAT, group_size=g, in_features=K, out_features=N)


def json_key(d: Any) -> str:
    import json

    return json.dumps(d, sort_keys=True, default=str)
