"""compressed-tensors ``pack-quantized`` W4A16 checkpoints (``quant_method: compressed-tensors``;
written by llmcompressor and AutoRound's ``llm_compressor`` export).

config.json ``quantization_config``::

    "format": "pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null,
                                  "weights": {"num_bits": 4, "type": "int", "symmetric": true,
                                              "strategy": "group" | "channel", "group_size": 128,
                                              "actorder": null | "group" | "weight"
                                                          (| "dynamic" | "static")}}},
    "ignore": ["lm_head", "re:.*mlp.gate$"]

Only weight-only 4-bit integer schemes are accepted; every config group must use the same
scheme (anything else -- W8A8, FP8, NVFP4, activation quantization, mixed groups -- is refused
with :class:`Int4FormatError` naming the group). A layer is quantized when some group's targets
match it ("Linear" matches every linear layer; "re:" entries are regexes) and ``ignore`` does not.

Per quantized linear ``<p>`` (K = in, N = out, G = K/g; G = 1 for strategy channel)::

    <p>.weight_packed      int32 [N, K/8]  signed code + 8, packed along K low nibble first
    <p>.weight_scale       float [N, G]
    <p>.weight_zero_point  int32 [N/8, G]  asymmetric only: zero point + 8, packed along N (dim 0)
    <p>.weight_g_idx       int32 [K]       actorder "group" only
    <p>.weight_shape       int   [2]       (N, K)

w = (code - zp_code) * s; ``weight_packed`` already is the canonical qweight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import Int4FormatError
from ..weight import PACK_FACTOR, Int4Weight, ZeroKind
from . import _packing as P
from .base import ACT_DTYPE, CheckpointFormat, LayerGeometry, TensorSpec, _module_matches

SUPPORTED_FORMATS = ("pack-quantized",)


def _bad(msg: str, key: str, expected: Any, found: Any) -> Int4FormatError:
    return Int4FormatError(f"compressed-tensors: {msg}", file="config.json",
                           tensor=f"quantization_config.{key}", expected=expected, found=found)


def _scheme_of(name: str, grp: dict[str, Any], default_format: str) -> tuple:
    """Validate one config group; return (group_size, symmetric, actorder)."""
    key = f"config_groups.{name}"
    if grp.get("input_activations") or grp.get("output_activations"):
        raise _bad("activation quantization (e.g. W8A8/W4A8) is not supported; int4xpu is "
                   "weight-only", key + ".input_activations", None, grp.get("input_activations"))
    w = grp.get("weights")
    if not w:
        raise _bad("config group has no weight scheme", key + ".weights", "a W4A16 scheme", w)
    fmt = str(grp.get("format") or default_format)
    if fmt not in SUPPORTED_FORMATS:
        raise _bad("unsupported compression format", key + ".format", list(SUPPORTED_FORMATS), fmt)
    if w.get("num_bits") != 4 or str(w.get("type", "int")) != "int":
        raise _bad("only 4-bit integer weights are supported", key + ".weights",
                   {"num_bits": 4, "type": "int"},
                   {"num_bits": w.get("num_bits"), "type": w.get("type")})
    if w.get("dynamic"):
        raise _bad("dynamic weight quantization is not supported", key + ".weights.dynamic",
                   False, w.get("dynamic"))
    strategy = str(w.get("strategy", "group"))
    if strategy == "group":
        g = w.get("group_size")
        if not isinstance(g, int) or g <= 0:
            raise _bad("bad group size", key + ".weights.group_size", "a positive int", g)
    elif strategy == "channel":
        g = -1
    else:
        raise _bad("unsupported weight strategy", key + ".weights.strategy", ["group", "channel"],
                   strategy)
    actorder = w.get("actorder")
    # compressed-tensors aliases: "dynamic" is "group" (g_idx stored), "static" is "weight"
    # (calibration only: the stored layout is that of no act-order)
    actorder = {"dynamic": "group", "static": None}.get(actorder, actorder)
    actorder = None if actorder in (None, False) else str(actorder)
    if actorder not in (None, "group", "weight"):
        raise _bad("unsupported actorder", key + ".weights.actorder", [None, "group", "weight"],
                   actorder)
    return g, bool(w.get("symmetric", True)), actorder


@dataclass
class CompressedTensorsFormat(CheckpointFormat):
    name: ClassVar[str] = "compressed-tensors"
    targets: list[str] = field(default_factory=list)

    @classmethod
    def matches(cls, cfg: dict[str, Any]) -> bool:
        return str(cfg.get("quant_method", "")).lower() in ("compressed-tensors", "compressed_tensors")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "CompressedTensorsFormat":
        groups = cfg.get("config_groups") or {}
        if not groups:
            raise _bad("no config_groups", "config_groups", "at least one W4A16 group", groups)
        sparsity = cfg.get("sparsity_config") or {}
        if sparsity.get("format") not in (None, "dense"):
            raise _bad("sparse checkpoints are not supported", "sparsity_config.format", "dense",
                       sparsity.get("format"))
        if cfg.get("transform_config"):
            raise _bad("transformed (rotated) checkpoints are not supported", "transform_config",
                       None, "present")
        default_format = str(cfg.get("format") or "pack-quantized")
        schemes, targets = {}, []
        for name, grp in groups.items():
            schemes[name] = _scheme_of(name, grp, default_format)
            targets.extend(grp.get("targets") or ["Linear"])
        distinct = set(schemes.values())
        if len(distinct) > 1:
            raise _bad("config groups use different schemes", "config_groups",
                       "one scheme for all groups", schemes)
        g, sym, actorder = distinct.pop()
        return cls(bits=4, group_size=g, zero_kind=ZeroKind.NONE if sym else ZeroKind.INT,
                   act_order=actorder == "group", skip_modules=list(cfg.get("ignore") or []),
                   raw=dict(cfg), targets=targets)

    def is_layer_quantized(self, prefix: str) -> bool:
        if not super().is_layer_quantized(prefix):
            return False
        for t in self.targets:
            if t == "Linear" or (t.startswith("re:") and re.match(t[3:], prefix)) \
                    or (not t.startswith("re:") and _module_matches(prefix, t)):
                return True
        return False

    def _groups(self, geo: LayerGeometry) -> tuple[int, int, int | None]:
        # weight_scale is [N, G]: the group dim is 1
        return self.scale_groups(geo, scale_name="weight_scale", group_dim=1)

    def tensor_specs(self, geo: LayerGeometry) -> list[TensorSpec]:
        K, N = geo.in_per_partition, geo.out_per_partition
        if K % PACK_FACTOR or N % PACK_FACTOR:
            raise Int4FormatError("compressed-tensors: in/out features must be multiples of 8",
                                  tensor="weight_packed", expected="K % 8 == 0 and N % 8 == 0",
                                  found=[K, N])
        _, groups, in_dim = self._groups(geo)
        specs = [
            TensorSpec("weight_packed", (N, K // PACK_FACTOR), torch.int32, output_dim=0,
                       input_dim=1, packed_dim=1, packed_factor=PACK_FACTOR),
            TensorSpec("weight_scale", (N, groups), ACT_DTYPE, output_dim=0, input_dim=in_dim),
            TensorSpec("weight_shape", (2,), torch.int64, optional=True),
        ]
        if self.zero_kind == ZeroKind.INT:
            specs.append(TensorSpec("weight_zero_point", (N // PACK_FACTOR, groups), torch.int32,
                                    output_dim=0, input_dim=in_dim, packed_dim=0,
                                    packed_factor=PACK_FACTOR))
        if self.act_order:
            specs.append(TensorSpec("weight_g_idx", (K,), torch.int32, input_dim=0, optional=True))
        return specs

    def to_canonical(self, t: dict[str, torch.Tensor], geo: LayerGeometry) -> Int4Weight:
        K, N = geo.in_per_partition, geo.out_per_partition
        g, groups, _ = self._groups(geo)
        f = self.name
        qweight = P.as_int32(P.expect(t.get("weight_packed"), "weight_packed",
                                      (N, K // PACK_FACTOR), fmt=f))
        scale = P.expect(t.get("weight_scale"), "weight_scale", (N, groups), fmt=f)
        scales = P.expect_float(scale, "weight_scale", fmt=f).t().contiguous()
        zeros, zero_kind = None, ZeroKind.NONE
        if self.zero_kind == ZeroKind.INT:
            zp = P.expect(t.get("weight_zero_point"), "weight_zero_point",
                          (N // PACK_FACTOR, groups), fmt=f)
            zeros = P.zero_codes(zp.t().contiguous(), 0, tensor="weight_zero_point", fmt=f)
            zero_kind = ZeroKind.INT
        g_idx = t.get("weight_g_idx")
        if g_idx is not None:
            g_idx = P.check_g_idx(g_idx, K, groups, tensor="weight_g_idx", fmt=f)
            if P.is_trivial_g_idx(g_idx, g) and groups == K // g:
                g_idx = None
        elif self.act_order and groups != K // g:
            raise Int4FormatError("compressed-tensors: actorder group checkpoint without g_idx",
                                  tensor="weight_g_idx", expected=[K], found=None)
        return Int4Weight(qweight=qweight, scales=scales, zeros=zeros, zero_kind=zero_kind,
                          group_size=g, in_features=K, out_features=N, g_idx=g_idx)
