"""GPTQ checkpoints (``quant_method: gptq``; AutoGPTQ, GPTQModel, AutoRound's GPTQ export).

config.json ``quantization_config``: ``bits``, ``group_size`` (-1 = per-channel), ``desc_act``,
``sym``, ``checkpoint_format`` (``gptq`` = v1, the default, or ``gptq_v2``), optionally
``modules_in_block_to_quantize`` and GPTQModel's ``dynamic`` ("-:regex" entries skip modules).

Per quantized linear ``<p>`` (K = in, N = out, G = K/g)::

    <p>.qweight  int32 [K/8, N]   8 codes per word along K, low nibble first
    <p>.qzeros   int32 [G, N/8]   zero points packed along N; v1 stores zp - 1, v2 stores zp
    <p>.scales   fp16  [G, N]
    <p>.g_idx    int32 [K]        group of input channel k (meaningful when desc_act)

w[n, k] = (q[k, n] - zp[g_idx[k], n]) * scales[g_idx[k], n]. The canonical qweight is the GPTQ
qweight transposed (same words), scales are already [G, N], zero points are unpacked to int8.
Symmetric checkpoints whose zero points are all 8 become canonical "no zero points".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import Int4FormatError
from ..weight import PACK_FACTOR, Int4Weight, ZeroKind
from . import _packing as P
from .base import ACT_DTYPE, CheckpointFormat, LayerGeometry, TensorSpec, check_bits, check_group_size


logger = logging.getLogger("vllm.int4xpu")
_WARNED_ZP16 = False  # the zp = 16 warning is given once per process (then debug)


def _skip_from_dynamic(dynamic: Any, fmt: str) -> list[str]:
    """GPTQModel ``dynamic``: "-:regex" skips modules; "+:regex" overrides must match ours."""
    skips = []
    for key, override in (dynamic or {}).items():
        if key.startswith("-:"):
            skips.append("re:" + key[2:])
        elif override:
            raise Int4FormatError(f"{fmt}: per-module overrides in 'dynamic' are not supported",
                                  file="config.json", tensor=f"quantization_config.dynamic[{key!r}]",
                                  expected="only '-:' (skip) entries", found=override)
    return skips


@dataclass
class GPTQLayout(CheckpointFormat):
    """The GPTQ tensor layout; ``zp_offset`` is 1 for v1 (zp - 1 stored) and 0 for v2."""

    name: ClassVar[str] = "gptq"
    zp_offset: int = 1
    checkpoint_format: str = "gptq"
    block_modules: tuple[str, ...] = ()  # modules_in_block_to_quantize (empty = all)

    # ------------------------------------------------------------------ per layer
    def _groups(self, geo: LayerGeometry) -> tuple[int, int, int | None]:
        """(partition group size, number of scale rows, scales input_dim)."""
        if geo.in_per_partition % PACK_FACTOR:
            raise Int4FormatError(f"{self.name}: in_features must be a multiple of 8",
                                  tensor="qweight", expected="K % 8 == 0", found=geo.in_per_partition)
        return self.scale_groups(geo)

    def tensor_specs(self, geo: LayerGeometry) -> list[TensorSpec]:
        K, N = geo.in_per_partition, geo.out_per_partition
        if N % PACK_FACTOR:
            raise Int4FormatError(f"{self.name}: out_features must be a multiple of 8",
                                  tensor="qzeros", expected="N % 8 == 0", found=N)
        _, groups, in_dim = self._groups(geo)
        return [
            TensorSpec("qweight", (K // PACK_FACTOR, N), torch.int32, output_dim=1, input_dim=0,
                       packed_dim=0, packed_factor=PACK_FACTOR),
            TensorSpec("scales", (groups, N), ACT_DTYPE, output_dim=1, input_dim=in_dim),
            TensorSpec("qzeros", (groups, N // PACK_FACTOR), torch.int32, output_dim=1,
                       input_dim=in_dim, packed_dim=1, packed_factor=PACK_FACTOR),
            TensorSpec("g_idx", (K,), torch.int32, input_dim=0, optional=True),
        ]

    def to_canonical(self, t: dict[str, torch.Tensor], geo: LayerGeometry) -> Int4Weight:
        K, N = geo.in_per_partition, geo.out_per_partition
        g, groups, _ = self._groups(geo)
        f = self.name
        qweight = P.expect(t.get("qweight"), "qweight", (K // PACK_FACTOR, N), fmt=f)
        qweight = P.gptq_qweight_to_canonical(qweight)
        scales = P.expect_float(P.expect(t.get("scales"), "scales", (groups, N), fmt=f), "scales", fmt=f)
        qz = P.expect(t.get("qzeros"), "qzeros", (groups, N // PACK_FACTOR), fmt=f)
        zeros = P.zero_codes(qz, self.zp_offset, tensor="qzeros", fmt=f, max_zp=15 + self.zp_offset)
        zero_kind = ZeroKind.INT
        if bool(torch.all(zeros == 8)):
            zeros, zero_kind = None, ZeroKind.NONE
        elif int(zeros.max()) > 15:
            # v1's stored 15 = zp 16 (see P.zero_codes): not a 4-bit code, so this layer gets
            # float zero points z = (8 - zp) * s, exact in fp32: w = (q - 8) s + z = (q - zp) s.
            global _WARNED_ZP16
            (logger.debug if _WARNED_ZP16 else logger.warning)(
                "%s: zero point 16 (stored 15: the zp - 1 underflow of old GPTQ v1 packers) in %d "
                "(group, column) pairs of a layer; such layers are loaded with exact float zero "
                "points (w = (q - 16) * s there, as the producer's dequantization and vLLM's GPTQ "
                "kernels compute it)", f, int((zeros > 15).sum()))
            _WARNED_ZP16 = True
            zeros = (8.0 - zeros.to(torch.float32)) * scales.to(torch.float32)
            zero_kind = ZeroKind.FLOAT
        g_idx = t.get("g_idx")
        if g_idx is not None:
            g_idx = P.check_g_idx(g_idx, K, groups if self.act_order else geo.in_full // g + 1,
                                  tensor="g_idx", fmt=f)
            if not self.act_order:
                # Without act-order g_idx is k // g (sharded: shifted by this rank's first group).
                local = g_idx - g_idx[0] if g_idx.numel() else g_idx
                if not P.is_trivial_g_idx(local, g):
                    raise Int4FormatError(f"{f}: g_idx is not k // group_size but desc_act is false",
                                          tensor="g_idx", expected="k // group_size",
                                          found="a permuted group index")
                g_idx = None
            elif P.is_trivial_g_idx(g_idx, g) and groups == K // g:
                g_idx = None
        elif self.act_order:
            raise Int4FormatError(f"{f}: desc_act checkpoint without g_idx", tensor="g_idx",
                                  expected=[K], found=None)
        return Int4Weight(qweight=qweight, scales=scales, zeros=zeros, zero_kind=zero_kind,
                          group_size=g, in_features=K, out_features=N, g_idx=g_idx)

    def is_layer_quantized(self, prefix: str) -> bool:
        if not super().is_layer_quantized(prefix):
            return False
        if self.block_modules:
            return any(prefix == m or prefix.endswith("." + m) for m in self.block_modules)
        return True

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["checkpoint_format"] = self.checkpoint_format
        return d


@dataclass
class GPTQFormat(GPTQLayout):
    name: ClassVar[str] = "gptq"

    @classmethod
    def matches(cls, cfg: dict[str, Any]) -> bool:
        return str(cfg.get("quant_method", "")).lower() == "gptq"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "GPTQFormat":
        bits = check_bits(cfg.get("bits"), "gptq")
        g = check_group_size(cfg.get("group_size", 128), "gptq")
        ckpt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
        if cfg.get("is_marlin_format") or ckpt not in ("gptq", "gptq_v2"):
            raise Int4FormatError("gptq: unsupported checkpoint_format", file="config.json",
                                  tensor="quantization_config.checkpoint_format",
                                  expected=["gptq", "gptq_v2"],
                                  found="marlin" if cfg.get("is_marlin_format") else ckpt)
        if cfg.get("lm_head"):
            raise Int4FormatError("gptq: a quantized lm_head is not supported", file="config.json",
                                  tensor="quantization_config.lm_head", expected=False, found=True)
        sym = bool(cfg.get("sym", True))
        blocks = cfg.get("modules_in_block_to_quantize") or []
        flat = tuple(m for b in blocks for m in (b if isinstance(b, list) else [b]))
        return cls(bits=bits, group_size=g, zero_kind=ZeroKind.NONE if sym else ZeroKind.INT,
                   act_order=bool(cfg.get("desc_act", False)) and g != -1,
                   skip_modules=_skip_from_dynamic(cfg.get("dynamic"), "gptq"),
                   raw=dict(cfg), zp_offset=0 if ckpt == "gptq_v2" else 1,
                   checkpoint_format=ckpt, block_modules=flat)
