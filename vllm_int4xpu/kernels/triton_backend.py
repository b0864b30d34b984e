"""Backend ``triton``: portable Triton int4 GEMM (CUDA and Intel GPUs).

Three algorithms (``kernels/triton_kernels/``, one file each) and one dispatch rule
(:func:`choose_config`): a tuned table per device family (JSON under ``triton_configs/``) maps
(K x N shape, M bucket) to the algorithm and its launch parameters; unknown shapes use the
family's default row for that M bucket. Lookups are cached per (family, K, N, M bucket).

``prepare`` keeps the canonical packed weight as is (both the GEMV and the tensor-core kernel
read it along K), resolves act-order by permuting input channels once, and keeps zero
points as stored. ``apply`` allocates only its output (and a split-K workspace or a dequantized
weight chunk, all torch.empty), never syncs with the host, and so is CUDA-graph safe. Split-K
uses one zeroed int32 tile-counter buffer per device (``triton_kernels.common.tile_counters``,
created in ``prepare``) that every launch leaves zeroed again; launches sharing it must be
stream-ordered, as a model's forward pass is.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..weight import Int4Weight, ZeroKind
from .base import Int4Kernel, Int4LinearSpec, gather_act_order, permute_for_act_order

try:  # a missing or broken Triton is a refusal, not an import error
    import triton  # noqa: F401

    from . import triton_kernels as tk
    _TRITON_ERROR: Optional[str] = None
except Exception as e:  # pragma: no cover - depends on the install
    tk = None
    _TRITON_ERROR = f"triton not importable ({type(e).__name__}: {e})"

logger = logging.getLogger("vllm.int4xpu")

CONFIG_DIR = Path(__file__).with_name("triton_configs")
ENV_CONFIG_FAMILY = "VLLM_INT4XPU_TRITON_FAMILY"  # force a config file, e.g. "cuda_h100"
_ZERO_CODE = {ZeroKind.NONE: 0, ZeroKind.INT: 1, ZeroKind.FLOAT: 2}
_MIN_BLOCK_K = 16  # tl.dot needs K tiles of at least 16


def lowest_pow2_divisor(n: int) -> int:
    return n & -n


def device_family(device: torch.device) -> str:
    """Name of the config file to use for ``device`` (without .json)."""
    forced = os.environ.get(ENV_CONFIG_FAMILY)
    if forced:
        return forced
    return _device_family(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _device_family(dev_type: str, index: Optional[int]) -> str:
    # cached: asking the driver for the device name costs microseconds on every eager call
    device = torch.device(dev_type, index) if index is not None else torch.device(dev_type)
    if device.type == "xpu":
        return "xpu"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name or "H800" in name or "GH200" in name:
            return "cuda_h100"
        return "cuda_default"
    return "cuda_h100"  # CPU: only the interpreter runs here; any table will do


@functools.lru_cache(maxsize=None)
def load_config_table(family: str) -> dict:
    path = CONFIG_DIR / f"{family}.json"
    if not path.exists():
        logger.info("int4xpu triton: no tuned configs for %r, using cuda_h100.json", family)
        path = CONFIG_DIR / "cuda_h100.json"
    with open(path) as f:
        return json.load(f)


def m_bucket(M: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= M (the last one for larger M)."""
    for b in buckets:
        if M <= b:
            return b
    return buckets[-1]


@functools.lru_cache(maxsize=4096)
def choose_config(family: str, M: int, K: int, N: int, group: int) -> tuple[str, dict]:
    """THE dispatch rule: (algorithm, launch params) for an M x K x N problem on ``family``.

    The table's rows are M buckets; a row is ``{"algo": "gemv"|"gemm"|"dequant", params...}``.
    Shape-specific rows (key "KxN") override the family default. BLOCK_K is clipped so a K tile
    never straddles two groups.
    """
    table = load_config_table(family)
    rows = dict(table["default"])
    rows.update(table.get("shapes", {}).get(f"{K}x{N}", {}))
    buckets = sorted(int(b) for b in rows)
    row = dict(rows[str(m_bucket(M, buckets))])
    algo = row.pop("algo")
    if "BLOCK_K" in row:
        row["BLOCK_K"] = fit_block_k(row["BLOCK_K"], group, K)
    if algo == "gemv" and "BLOCK_M" in row:
        row.pop("BLOCK_M")
    row.update(table.get("launch_options", {}).get(algo, {}))
    return algo, row


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fit_block_k(bk: int, group: int, K: int) -> int:
    """Clip a K tile so it never straddles two groups (and does not over-pad a tiny K)."""
    if group < K:  # grouped: BLOCK_K must divide the group size
        return min(bk, lowest_pow2_divisor(group))
    return min(bk, max(_MIN_BLOCK_K, triton_next_pow2(K)))  # per-channel: any tile


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: Optional[torch.Tensor], zero_kind: ZeroKind, group: int,
                bias: Optional[torch.Tensor] = None, family: Optional[str] = None,
                algo: Optional[str] = None, **override) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a 2-D contiguous x [M, K] on the canonical (grouped) weight.

    ``algo`` bypasses the table (tests and tuning): the launch then takes exactly ``override``
    (nothing is inherited from the table's row, so a measured or tested config is the one that
    runs); without ``algo``, :func:`choose_config`'s row updated by ``override``.
    """
    M, K = x.shape
    N = qweight.shape[0]
    if algo is None:
        algo, cfg = choose_config(family or device_family(x.device), M, K, N, group)
        cfg = dict(cfg, **override)  # never mutate the cache
    else:
        cfg = dict(override)
    cfg["BLOCK_K"] = fit_block_k(cfg.get("BLOCK_K", 128), group, K)  # launcher defaults too
    z = zeros if (zero_kind != ZeroKind.NONE and zeros is not None) else scales
    code = _ZERO_CODE[ZeroKind(zero_kind)]
    if algo == "dequant":
        return tk.int4_dequant_matmul(x, qweight, scales, z, code, group, bias, **cfg)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return tk.ALGORITHMS[algo](x, qweight, scales, z, code, group, bias, out, **cfg)


class TritonKernel(Int4Kernel):
    name = "triton"
    tensor_names = ("qweight", "scales", "zeros", "perm")

    @classmethod
    def can_implement(cls, spec: Int4LinearSpec):
        if _TRITON_ERROR:
            return False, _TRITON_ERROR
        if spec.device_type not in ("cuda", "xpu"):
            return False, f"device {spec.device_type!r} has no Triton GPU target (cuda/xpu only)"
        if spec.act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"activation dtype {spec.act_dtype} not bf16/fp16/fp32"
        K, g = spec.in_features, spec.group_size
        if K % 8:
            return False, f"in_features {K} not a multiple of 8"
        if not spec.is_per_channel and lowest_pow2_divisor(g) < _MIN_BLOCK_K:
            return False, f"group size {g} not a multiple of {_MIN_BLOCK_K}"
        if spec.device_type == "cuda" and spec.act_dtype == torch.bfloat16:
            if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
                return False, "bf16 tensor cores need compute capability >= 8.0"
        return True, None

    def prepare(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        dev = w.qweight.device
        if dev.type != "cpu":
            tk.common.tile_counters(dev)  # allocate now, not during CUDA-graph capture
        w, perm = permute_for_act_order(w)
        if w.zero_kind != ZeroKind.NONE:  # int8 or float, kept as stored (kernels widen to fp32)
            zeros = w.zeros.contiguous()
        else:
            zeros = torch.empty(0, dtype=torch.int8, device=dev)
        return {"qweight": w.qweight.contiguous(), "scales": w.scales.contiguous(),
                "zeros": zeros, "perm": perm}

    def apply(self, tensors, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qweight, scales, zeros, perm = tensors
        x = gather_act_order(x, perm)
        if not x.is_contiguous():
            x = x.contiguous()
        return int4_matmul(x, qweight, scales, zeros, self.spec.zero_kind, self.spec.group_size,
                           bias)
