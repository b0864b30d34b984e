"""What a checkpoint format adapter is: disk tensors -> canonical :class:`Int4Weight`.

A format describes, per linear layer, which tensors it reads (:class:`TensorSpec`: name, the
per-partition shape, dtype, and which dims are the output / input / packed dims) and how those
tensors become the canonical weight (:meth:`CheckpointFormat.to_canonical`). The vLLM adapter
turns each TensorSpec into vLLM's parameter classes, so tensor-parallel sharding (including
tensors packed along the output dim) is vLLM's own machinery. Formats never import vLLM and
never know which kernel backend will run.
"""

from __future__ import annotations

import fnmatch
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch

from ..errors import Int4FormatError
from ..weight import Int4Weight, ZeroKind

ACT_DTYPE = "act"  # TensorSpec.dtype placeholder: the model's activation/params dtype


@dataclass(frozen=True)
class TensorSpec:
    """One per-layer checkpoint tensor, as held by one tensor-parallel partition."""

    name: str  # suffix after the layer prefix, e.g. "qweight"
    shape: tuple[int, ...]  # per-partition shape (packed dims already divided)
    dtype: Union[torch.dtype, str]  # or ACT_DTYPE
    output_dim: Optional[int] = None  # dim sharded by column parallelism
    input_dim: Optional[int] = None  # dim sharded by row parallelism (None = replicated)
    packed_dim: Optional[int] = None  # dim holding packed codes
    packed_factor: int = 1
    optional: bool = False  # absent from some checkpoints (e.g. g_idx)


@dataclass(frozen=True)
class LayerGeometry:
    """Sizes of one linear layer partition (K = in, N = out)."""

    in_per_partition: int
    out_per_partition: int
    in_full: int
    out_full: int

    @property
    def row_parallel(self) -> bool:
        return self.in_per_partition != self.in_full


@dataclass
class CheckpointFormat(ABC):
    """A parsed ``quantization_config`` of one checkpoint format."""

    name: ClassVar[str]
    bits: int = 4
    group_size: int = 128  # -1 = per-channel
    zero_kind: ZeroKind = ZeroKind.NONE
    act_order: bool = False
    skip_modules: list[str] = field(default_factory=list)  # not quantized (patterns or prefixes)
    raw: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- class-level detection
    @classmethod
    @abstractmethod
    def matches(cls, hf_quant_cfg: dict[str, Any]) -> bool:
        """Is this checkpoint config of this format?"""

    @classmethod
    @abstractmethod
    def from_hf_config(cls, hf_quant_cfg: dict[str, Any]) -> "CheckpointFormat":
        """Parse and validate (bits must be 4...); raise Int4FormatError on bad config."""

    # ----------------------------------------------------------------- per layer
    @abstractmethod
    def tensor_specs(self, geo: LayerGeometry) -> list[TensorSpec]:
        """Tensors of one layer partition."""

    @abstractmethod
    def to_canonical(self, tensors: dict[str, torch.Tensor], geo: LayerGeometry) -> Int4Weight:
        """Convert one loaded layer partition to the canonical weight (not yet validated)."""

    def disk_to_canonical(self, tensors: dict[str, torch.Tensor], K: int, N: int) -> Int4Weight:
        """A whole (unsharded) layer's disk tensors -> canonical weight, not yet validated: the
        load hook and conversion of loading, for a K x N layer read outside vLLM."""
        geo = LayerGeometry(K, N, K, N)
        return self.to_canonical({s.name: self.prepare_loaded(s.name, tensors[s.name], geo)
                                  for s in self.tensor_specs(geo) if s.name in tensors}, geo)

    def group_size_for(self, geo: LayerGeometry) -> int:
        """Canonical group size of a partition (per-channel -> the partition's K)."""
        return geo.in_per_partition if self.group_size in (-1, 0, None) else self.group_size

    # Checkpoint tensor suffixes that are metadata, not weights (dropped before loading).
    dropped_suffixes: ClassVar[tuple[str, ...]] = ()

    def prepare_loaded(self, name: str, tensor: torch.Tensor, geo: LayerGeometry) -> torch.Tensor:
        """Hook on each *whole* checkpoint tensor before vLLM shards it (default: unchanged).

        For layouts that vLLM's parameter classes cannot shard (HQQ's row-split packing):
        return the tensor in a layout its TensorSpec describes. ``geo`` is the layer's.
        """
        return tensor

    def scale_groups(self, geo: LayerGeometry, scale_name: str = "scales",
                     group_dim: int = 0) -> tuple[int, int, Optional[int]]:
        """(partition group size, scale rows, input_dim of the scale tensors) for a partition.

        Scales follow the input shard (``group_dim``) unless there is one group (per-channel) or
        a partition needs groups it does not own (act-order on a row-parallel layer: each rank's
        g_idx may point anywhere in the full table, so every rank keeps all of it).
        """
        K = geo.in_per_partition
        g = self.group_size_for(geo)
        if self.group_size in (-1, 0, None):
            return g, 1, None
        if K % g:
            raise Int4FormatError(f"{self.name}: group size must divide the partition's in_features",
                                  tensor=scale_name, expected=f"a divisor of {K}", found=g)
        if self.act_order and geo.row_parallel:
            return g, geo.in_full // g, None
        return g, K // g, group_dim

    def is_layer_quantized(self, prefix: str) -> bool:
        """False for modules the checkpoint left unquantized (skip/ignore lists)."""
        return not any(_module_matches(prefix, p) for p in self.skip_modules)

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "bits": self.bits,
                "group_size": "channel" if self.group_size in (-1, 0, None) else self.group_size,
                "zero_point": self.zero_kind.value, "act_order": self.act_order}


def check_bits(bits: Any, fmt: str) -> int:
    if bits != 4:
        raise Int4FormatError(f"{fmt}: only 4-bit weights are supported", file="config.json",
                              tensor="quantization_config.bits", expected=4, found=bits)
    return 4


def check_group_size(group_size: Any, fmt: str) -> int:
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise Int4FormatError(f"{fmt}: bad group size", file="config.json",
                              tensor="quantization_config.group_size",
                              expected="a positive int or -1", found=group_size)
    return group_size


def _module_matches(prefix: str, pattern: str) -> bool:
    """Match a vLLM layer prefix against a skip entry: a name, a dotted suffix, or 're:' regex."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], prefix) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatch(prefix, pattern)
    return prefix == pattern or prefix.endswith("." + pattern) or ("." + pattern + ".") in ("." + prefix + ".")
