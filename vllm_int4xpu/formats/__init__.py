"""Checkpoint format adapters (disk -> canonical Int4Weight). No vLLM, no kernels here."""

from __future__ import annotations

from typing import Any, Optional

from .base import ACT_DTYPE, CheckpointFormat, LayerGeometry, TensorSpec
from .autoround import AutoRoundFormat
from .awq import AWQFormat
from .compressed_tensors import CompressedTensorsFormat
from .gptq import GPTQFormat
from .hqq import HQQFormat
from .native import NativeFormat
from .torchao import TorchAOFormat

# Detection order: the first whose ``matches`` accepts the config wins (native first).
FORMATS: list[type[CheckpointFormat]] = [NativeFormat, GPTQFormat, AWQFormat,
                                         CompressedTensorsFormat, AutoRoundFormat, HQQFormat,
                                         TorchAOFormat]


def detect_format(hf_quant_cfg: Optional[dict[str, Any]]) -> Optional[type[CheckpointFormat]]:
    if not hf_quant_cfg:
        return None
    for fmt in FORMATS:
        if fmt.matches(hf_quant_cfg):
            return fmt
    return None


# Stand-alone quantization config files of older producers (when config.json has no
# ``quantization_config``): AutoGPTQ's quantize_config.json, AutoAWQ's quant_config.json.
LEGACY_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


def with_legacy_quant_method(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill in ``quant_method`` for the stand-alone files of older producers, which lack it:
    AutoAWQ's keys (``w_bit``, ``q_group_size``, ``version``) mean awq, AutoGPTQ's (``desc_act``,
    ``damp_percent``, ``sym``, ``static_groups``) mean gptq. Anything else is left unchanged."""
    if not isinstance(cfg, dict) or cfg.get("quant_method"):
        return cfg
    if any(k in cfg for k in ("w_bit", "q_group_size", "version")):
        return {**cfg, "quant_method": "awq"}
    if any(k in cfg for k in ("desc_act", "damp_percent", "sym", "static_groups")):
        return {**cfg, "quant_method": "gptq"}
    return cfg


def parse_format(hf_quant_cfg: dict[str, Any]) -> CheckpointFormat:
    from ..errors import Int4FormatError

    fmt = detect_format(hf_quant_cfg)
    if fmt is None:
        raise Int4FormatError("unsupported int4 checkpoint format", file="config.json",
                              tensor="quantization_config.quant_method",
                              expected=[f.name for f in FORMATS],
                              found=(hf_quant_cfg or {}).get("quant_method"))
    return fmt.from_hf_config(hf_quant_cfg)


__all__ = ["ACT_DTYPE", "CheckpointFormat", "LayerGeometry", "TensorSpec", "NativeFormat",
           "FORMATS", "LEGACY_CONFIG_FILES", "detect_format", "parse_format",
           "with_legacy_quant_method"]
