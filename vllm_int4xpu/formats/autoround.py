"""AutoRound checkpoints (``quant_method: auto-round``), in any of its int4 packings.

AutoRound writes GPTQ- or AWQ-layout tensors and names the layout in ``packing_format``:

* ``auto_round:auto_gptq``               GPTQ layout, zero points stored as zp - 1 (GPTQ v1)
* ``auto_round`` / ``auto_round:gptqmodel`` GPTQ layout, zero points stored as is (GPTQ v2)
* ``auto_round:auto_awq``                AWQ GEMM layout

(AutoRound's ``format="auto_gptq"`` / ``"auto_awq"`` exports write plain ``quant_method: gptq`` /
``awq`` configs instead; :mod:`.gptq` and :mod:`.awq` read those.) Other keys: ``bits``,
``group_size``, ``sym``, ``data_type`` (must be int), ``block_name_to_quantize`` (modules outside
these blocks are not quantized) and ``extra_config`` (per-module overrides: ``bits >= 16``
means left unquantized; any other override must match the global scheme).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import Int4FormatError
from ..weight import ZeroKind
from .awq import AWQLayout
from .base import CheckpointFormat, check_bits, check_group_size
from .gptq import GPTQLayout

GPTQ_V1_PACKINGS = ("auto_round:auto_gptq",)
GPTQ_V2_PACKINGS = ("auto_round", "auto_round:gptqmodel", "auto_round:gptq")
AWQ_PACKINGS = ("auto_round:auto_awq", "auto_round:awq")


class _AutoRoundScope:
    """Which modules an AutoRound config quantizes (blocks + per-module overrides)."""

    blocks: tuple[str, ...]

    def _in_blocks(self, prefix: str) -> bool:
        return not self.blocks or any(prefix == b or prefix.startswith(b + ".") for b in self.blocks)

    def is_layer_quantized(self, prefix: str) -> bool:  # type: ignore[override]
        return CheckpointFormat.is_layer_quantized(self, prefix) and self._in_blocks(prefix)

    @classmethod
    def matches(cls, cfg: dict[str, Any]) -> bool:
        return AutoRoundFormat.matches(cfg)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> CheckpointFormat:
        return AutoRoundFormat.from_hf_config(cfg)

    def describe(self) -> dict[str, Any]:
        d = CheckpointFormat.describe(self)  # type: ignore[arg-type]
        d["packing_format"] = self.packing_format  # type: ignore[attr-defined]
        return d


@dataclass
class AutoRoundGPTQ(_AutoRoundScope, GPTQLayout):
    name: ClassVar[str] = "auto-round"
    packing_format: str = "auto_round:auto_gptq"
    blocks: tuple[str, ...] = ()


@dataclass
class AutoRoundAWQ(_AutoRoundScope, AWQLayout):
    name: ClassVar[str] = "auto-round"
    packing_format: str = "auto_round:auto_awq"
    blocks: tuple[str, ...] = ()


def _skips_from_extra_config(extra: Any, bits: int, g: int, sym: bool) -> list[str]:
    skips = []
    for mod, over in (extra or {}).items():
        over = over or {}
        if over.get("bits", bits) >= 16:  # kept in 16-bit
            skips.append(mod)
            continue
        same = (over.get("bits", bits) == bits and over.get("group_size", g) == g
                and bool(over.get("sym", sym)) == sym)
        if not same:
            raise Int4FormatError("auto-round: per-module overrides with another scheme are not "
                                  "supported", file="config.json",
                                  tensor=f"quantization_config.extra_config[{mod!r}]",
                                  expected={"bits": bits, "group_size": g, "sym": sym}, found=over)
    return skips


class AutoRoundFormat:
    """Detection and parsing; :meth:`from_hf_config` returns the GPTQ- or AWQ-layout flavour."""

    name = "auto-round"

    @classmethod
    def matches(cls, cfg: dict[str, Any]) -> bool:
        return str(cfg.get("quant_method", "")).lower() in ("auto-round", "intel/auto-round",
                                                             "auto_round")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> CheckpointFormat:
        bits = check_bits(cfg.get("bits"), "auto-round")
        g = check_group_size(cfg.get("group_size", 128), "auto-round")
        if str(cfg.get("data_type", "int")).lower() != "int":
            raise Int4FormatError("auto-round: only integer weights are supported",
                                  file="config.json", tensor="quantization_config.data_type",
                                  expected="int", found=cfg.get("data_type"))
        if cfg.get("act_bits", 16) < 16:
            raise Int4FormatError("auto-round: weight-only (act_bits 16) checkpoints only",
                                  file="config.json", tensor="quantization_config.act_bits",
                                  expected=16, found=cfg.get("act_bits"))
        sym = bool(cfg.get("sym", True))
        packing = str(cfg.get("packing_format") or "auto_round:auto_gptq").lower()
        blocks = cfg.get("block_name_to_quantize") or cfg.get("to_quant_block_names") or []
        if isinstance(blocks, str):
            blocks = [b.strip() for b in blocks.split(",") if b.strip()]
        blocks = tuple(b if isinstance(b, str) else os.path.commonprefix(list(b)).rstrip(".")
                       for b in blocks)
        common = dict(bits=bits, group_size=g, zero_kind=ZeroKind.NONE if sym else ZeroKind.INT,
                      skip_modules=_skips_from_extra_config(cfg.get("extra_config"), bits, g, sym),
                      raw=dict(cfg), packing_format=packing, blocks=blocks)
        if packing in GPTQ_V1_PACKINGS:
            return AutoRoundGPTQ(zp_offset=1, checkpoint_format="gptq", **common)
        if packing in GPTQ_V2_PACKINGS:
            return AutoRoundGPTQ(zp_offset=0, checkpoint_format="gptq_v2", **common)
        if packing in AWQ_PACKINGS:
            return AutoRoundAWQ(**common)
        raise Int4FormatError("auto-round: unsupported packing_format", file="config.json",
                              tensor="quantization_config.packing_format",
                              expected=list(GPTQ_V1_PACKINGS + GPTQ_V2_PACKINGS + AWQ_PACKINGS),
                              found=packing)
