"""The canonical int4 weight (DESIGN.md §1) and the reference math on it.

Every checkpoint format converts *into* :class:`Int4Weight`; every kernel backend consumes it.
:func:`dequantize` is the single reference definition of what the weight means; tests compare
every fast path against it (in float64).

Layout (N = out_features, K = in_features, g = group size):

* ``qweight``  int32 ``[N, K/8]``: code of element k of row n sits in word k//8 at bits 4*(k%8)
  (low nibble first).
* ``scales``   float ``[G, N]`` (G = K/g, or more groups when ``g_idx`` indexes a larger table).
* ``zeros``    int zero points: int8 ``[G, N]`` in 0..15, w = (q - zp) * s;
               float zero points: float ``[G, N]``, w = (q - 8) * s + z;
               ``None``: symmetric, zp = 8.
* ``g_idx``    optional int32 ``[K]``: group of input channel k (act-order / desc_act).

This module imports only torch: no vLLM, no kernels, no formats.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .errors import Int4FormatError

PACK_FACTOR = 8  # int4 codes per int32 word
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble k%8 -> bit offset


class ZeroKind(str, enum.Enum):
    """How zero points are stored: none (symmetric, zp=8), integer codes, or float offsets."""

    NONE = "none"
    INT = "int"
    FLOAT = "float"


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in 0..15 of shape [R, C] (C % 8 == 0) into int32 [R, C/8], low nibble first."""
    if codes.dim() != 2 or codes.shape[1] % PACK_FACTOR:
        raise Int4FormatError("codes to pack must be 2-D with a last dim divisible by 8",
                              tensor="codes", expected="[R, 8*k]", found=list(codes.shape))
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise Int4FormatError("int4 codes out of range", tensor="codes", expected="0..15",
                              found=f"{int(c.min())}..{int(c.max())}")
    c = c.view(c.shape[0], -1, PACK_FACTOR) << _SHIFTS.to(c.device)
    return _sum_nibbles(c)


def _sum_nibbles(shifted: torch.Tensor) -> torch.Tensor:
    # Shifted nibbles occupy disjoint bits, so OR == sum; OR keeps everything in int32 (the top
    # nibble wraps into the sign bit exactly as the on-disk formats store it).
    out = shifted[..., 0]
    for i in range(1, PACK_FACTOR):
        out = out | shifted[..., i]
    return out.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 [R, C/8] -> uint8 codes [R, C]."""
    if packed.dtype != torch.int32:
        raise Int4FormatError("packed int4 tensor must be int32", tensor="qweight",
                              expected="torch.int32", found=str(packed.dtype))
    p = packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)
    return (p & 0xF).to(torch.uint8).reshape(packed.shape[0], -1)


@dataclass
class Int4Weight:
    """A 4-bit weight-only quantized linear weight in the canonical layout (see module doc)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    zero_kind: ZeroKind
    group_size: int
    in_features: int
    out_features: int
    g_idx: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- construction helpers
    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def group_index(self) -> torch.Tensor:
        """int64 [K]: group of each input channel (g_idx or k // group_size)."""
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Int4Weight":
        """Move to ``device``; ``dtype`` changes scales (and float zeros) only."""
        def mv(t, float_cast):
            if t is None:
                return None
            t = t.to(device) if device is not None else t
            return t.to(dtype) if (dtype is not None and float_cast) else t
        return replace(self, qweight=mv(self.qweight, False), scales=mv(self.scales, True),
                       zeros=mv(self.zeros, self.zero_kind == ZeroKind.FLOAT),
                       g_idx=mv(self.g_idx, False))

    def validate(self, *, file: Optional[str] = None, name: str = "") -> "Int4Weight":
        """Check shapes, dtypes and values; raise :class:`Int4FormatError` on the first problem."""
        pre = f"{name}." if name else ""
        N, K, g = self.out_features, self.in_features, self.group_size

        def bad(msg, tensor, expected, found):
            raise Int4FormatError(msg, file=file, tensor=pre + tensor, expected=expected, found=found)

        if K % PACK_FACTOR:
            bad("in_features must be a multiple of 8", "qweight", "K % 8 == 0", K)
        if g <= 0 or K % g:
            bad("group size must divide in_features", "scales", f"a divisor of K={K}", g)
        if self.qweight.dtype != torch.int32:
            bad("qweight dtype", "qweight", "torch.int32", str(self.qweight.dtype))
        if tuple(self.qweight.shape) != (N, K // PACK_FACTOR):
            bad("qweight shape", "qweight", [N, K // PACK_FACTOR], list(self.qweight.shape))
        if not self.scales.is_floating_point():
            bad("scales dtype", "scales", "a float dtype", str(self.scales.dtype))
        G = K // g
        if self.g_idx is None:
            if tuple(self.scales.shape) != (G, N):
                bad("scales shape", "scales", [G, N], list(self.scales.shape))
        else:
            if tuple(self.g_idx.shape) != (K,):
                bad("g_idx length", "g_idx", [K], list(self.g_idx.shape))
            if self.scales.dim() != 2 or self.scales.shape[1] != N:
                bad("scales shape", "scales", ["G", N], list(self.scales.shape))
            if self.g_idx.numel() and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.scales.shape[0]):
                bad("g_idx out of range", "g_idx", f"0..{self.scales.shape[0] - 1}",
                    f"{int(self.g_idx.min())}..{int(self.g_idx.max())}")
        if not torch.isfinite(self.scales).all():
            bad("scales contain NaN or inf", "scales", "finite values", "non-finite")
        if self.zero_kind == ZeroKind.NONE:
            if self.zeros is not None:
                bad("symmetric weight must not carry zeros", "zeros", None, list(self.zeros.shape))
        else:
            if self.zeros is None:
                bad("zero points missing", "zeros", f"[{self.scales.shape[0]}, {N}]", None)
            if tuple(self.zeros.shape) != tuple(self.scales.shape):
                bad("zero point shape", "zeros", list(self.scales.shape), list(self.zeros.shape))
            if self.zero_kind == ZeroKind.INT:
                if self.zeros.dtype != torch.int8:
                    bad("integer zero points dtype", "zeros", "torch.int8", str(self.zeros.dtype))
                if self.zeros.numel() and (int(self.zeros.min()) < 0 or int(self.zeros.max()) > 15):
                    bad("integer zero points out of range", "zeros", "0..15",
                        f"{int(self.zeros.min())}..{int(self.zeros.max())}")
            else:
                if not self.zeros.is_floating_point():
                    bad("float zero points dtype", "zeros", "a float dtype", str(self.zeros.dtype))
                if not torch.isfinite(self.zeros).all():
                    bad("float zero points contain NaN or inf", "zeros", "finite values", "non-finite")
        return self


def dequantize(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization -> dense [N, K] in ``dtype`` (math in float64 when asked)."""
    calc = torch.float64 if dtype == torch.float64 else torch.float32
    q = unpack_int4(w.qweight).to(calc)  # [N, K]
    gi = w.group_index()
    s = w.scales.to(calc).t()[:, gi]  # [N, K]
    if w.zero_kind == ZeroKind.NONE:
        out = (q - 8.0) * s
    elif w.zero_kind == ZeroKind.INT:
        out = (q - w.zeros.to(calc).t()[:, gi]) * s
    else:
        out = (q - 8.0) * s + w.zeros.to(calc).t()[:, gi]
    return out.to(dtype)


def reference_linear(x: torch.Tensor, w: Int4Weight, bias: Optional[torch.Tensor] = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y = x @ dequantize(w)^T (+ bias) computed in ``dtype`` (float64 = the test oracle)."""
    y = x.to(dtype) @ dequantize(w, dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y


def check_quantizable(weight: torch.Tensor, group_size: int) -> tuple[int, int, int]:
    """(N, K, g) of a dense [N, K] weight to quantize with ``group_size`` (-1: per-channel);
    Int4FormatError unless 2-D, finite, K % 8 == 0 and g divides K."""
    if weight.dim() != 2:
        raise Int4FormatError("weight to quantize must be 2-D", tensor="weight", expected="[N, K]",
                              found=list(weight.shape))
    N, K = weight.shape
    g = K if group_size in (-1, 0, None) else int(group_size)
    if g <= 0 or K % g or K % PACK_FACTOR:
        raise Int4FormatError("group size must divide in_features (and K % 8 == 0)",
                              tensor="weight", expected=f"a divisor of K={K}", found=group_size)
    if not torch.isfinite(weight).all():
        raise Int4FormatError("weight to quantize has NaN or Inf values", tensor="weight",
                              expected="finite values", found="non-finite")
    return N, K, g


def quantize_rtn(weight: torch.Tensor, group_size: int, zero_kind: ZeroKind | str = ZeroKind.INT,
                 scale_dtype: torch.dtype = torch.bfloat16) -> Int4Weight:
    """Round-to-nearest int4 quantization of a dense [N, K] weight.

    ``group_size`` -1 (or K) means per-channel. ZeroKind.NONE is symmetric (zp = 8, codes use
    -8..7 around it); INT stores asymmetric integer zero points; FLOAT stores min-based float
    offsets (torchao/HQQ convention w = (q - 8) * s + z) in float32.
    """
    zero_kind = ZeroKind(zero_kind)
    N, K, g = check_quantizable(weight, group_size)
    w = weight.detach().to(torch.float32).reshape(N, K // g, g)
    if zero_kind == ZeroKind.NONE:
        amax = w.abs().amax(dim=-1).clamp_min(1e-8)
        s = (amax / 7.5)  # codes -8..7 cover [-8s, 7s]; 7.5 balances the two ends
        s = s.to(scale_dtype).to(torch.float32)
        q = torch.clamp(torch.round(w / s[..., None]) + 8, 0, 15)
        zeros = None
    else:
        wmin = w.amin(dim=-1)
        wmax = w.amax(dim=-1)
        s = ((wmax - wmin) / 15.0).clamp_min(1e-8)
        s = s.to(scale_dtype).to(torch.float32)
        if zero_kind == ZeroKind.INT:
            zp = torch.clamp(torch.round(-wmin / s), 0, 15)
            q = torch.clamp(torch.round(w / s[..., None]) + zp[..., None], 0, 15)
            zeros = zp.to(torch.int8).t().contiguous()
        else:
            # w ~ (q - 8) s + z with q in 0..15 spanning [wmin, wmax]: z = wmin + 8 s, kept in
            # float32 (a bf16 z would bias the whole group by up to |z| * 2^-9)
            z = wmin + 8.0 * s
            q = torch.clamp(torch.round((w - z[..., None]) / s[..., None]) + 8, 0, 15)
            zeros = z.t().contiguous()
    qweight = pack_int4(q.reshape(N, K).to(torch.int32))
    return Int4Weight(qweight=qweight, scales=s.to(scale_dtype).t().contiguous(), zeros=zeros,
                      zero_kind=zero_kind, group_size=g, in_features=K, out_features=N)


def act_order_permutation(g_idx: torch.Tensor) -> torch.Tensor:
    """Stable permutation that makes the groups of ``g_idx`` contiguous (k sorted by group)."""
    return torch.argsort(g_idx.to(torch.int64), stable=True)


def act_order_groups_even(w: Int4Weight) -> bool:
    """True when every group of ``w.g_idx`` present here has exactly ``group_size`` channels, so
    :func:`permute_input_channels` can make the groups contiguous. False for a row-parallel shard
    of a real act-order checkpoint, whose groups are scattered over the full K."""
    if w.g_idx is None:
        return True
    counts = torch.bincount(w.g_idx.to(torch.int64).cpu())
    return bool(torch.all((counts == 0) | (counts == w.group_size)))


def permute_input_channels(w: Int4Weight, perm: torch.Tensor) -> Int4Weight:
    """Return the weight with input channels reordered by ``perm`` and g_idx dropped.

    After sorting, each run of ``group_size`` channels must share one g_idx (true for a whole
    GPTQ desc_act layer, not for a row-parallel shard of one: see :func:`act_order_groups_even`);
    the scale/zero rows are gathered in that order so the result is a plain grouped weight.
    Callers then compute with ``x[:, perm]``. Raises Int4FormatError when the groups are uneven.
    """
    if w.g_idx is None:
        return w
    g = w.group_size
    gi = w.g_idx.to(torch.int64)[perm.to(w.g_idx.device)].view(-1, g)
    if not torch.equal(gi, gi[:, :1].expand_as(gi)):  # checks the runs ``perm`` gives
        raise Int4FormatError("g_idx groups are not all of group_size members; cannot reorder",
                              tensor="g_idx", expected=f"each group exactly {g} channels",
                              found="uneven groups")
    rows = gi[:, 0].to(w.scales.device)
    codes = unpack_int4(w.qweight)[:, perm.to(w.qweight.device)]
    return replace(w, qweight=pack_int4(codes), scales=w.scales[rows].contiguous(),
                   zeros=None if w.zeros is None else w.zeros[rows].contiguous(), g_idx=None)


# ---------------------------------------------------------------------------- mixture of experts
_ZERO_RANK = {ZeroKind.NONE: 0, ZeroKind.INT: 1, ZeroKind.FLOAT: 2}


def with_zero_kind(w: Int4Weight, kind: ZeroKind) -> Int4Weight:
    """The same weight with its zero points in a wider kind (none -> int -> float), exactly:
    none is int zp 8; int zp becomes the float z = (8 - zp) * s (in fp32, so w is unchanged)."""
    kind = ZeroKind(kind)
    if w.zero_kind == kind:
        return w
    if _ZERO_RANK[kind] < _ZERO_RANK[w.zero_kind]:
        raise ValueError(f"cannot narrow zero points from {w.zero_kind.value} to {kind.value}")
    if kind == ZeroKind.INT:  # from none
        return replace(w, zeros=torch.full(w.scales.shape, 8, dtype=torch.int8,
                                           device=w.scales.device), zero_kind=kind)
    zp = (torch.full(w.scales.shape, 8.0, device=w.scales.device) if w.zeros is None
          else w.zeros.to(torch.float32))
    return replace(w, zeros=(8.0 - zp) * w.scales.to(torch.float32), zero_kind=kind)


def widest_zero_kind(weights) -> ZeroKind:
    """The zero-point kind that holds every weight of ``weights`` exactly."""
    return max((ZeroKind(w.zero_kind) for w in weights), key=_ZERO_RANK.__getitem__)


@dataclass
class Int4Experts:
    """The canonical weights of E experts of one MoE projection, stacked on a leading dim:
    ``qweight`` [E, N, K/8], ``scales`` [E, G, N], ``zeros`` [E, G, N] or None, ``g_idx`` [E, K]
    or None; every expert has the same shapes, group size and zero-point kind (see :meth:`stack`).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    zero_kind: ZeroKind
    group_size: int
    in_features: int
    out_features: int
    g_idx: Optional[torch.Tensor] = None

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    def expert(self, e: int) -> Int4Weight:
        return Int4Weight(qweight=self.qweight[e], scales=self.scales[e],
                          zeros=None if self.zeros is None else self.zeros[e],
                          zero_kind=self.zero_kind, group_size=self.group_size,
                          in_features=self.in_features, out_features=self.out_features,
                          g_idx=None if self.g_idx is None else self.g_idx[e])

    def experts(self) -> list[Int4Weight]:
        return [self.expert(e) for e in range(self.num_experts)]

    def to_device(self, device) -> "Int4Experts":
        mv = (lambda t: None if t is None else t.to(device))
        return replace(self, qweight=mv(self.qweight), scales=mv(self.scales),
                       zeros=mv(self.zeros), g_idx=mv(self.g_idx))

    @classmethod
    def stack(cls, weights, zero_kind: Optional[ZeroKind] = None) -> "Int4Experts":
        """Stack per-expert weights. Experts whose zero points differ in kind (a GPTQ expert whose
        zero points are all 8 loads as symmetric) are widened exactly to ``zero_kind`` (default:
        the widest present); float zero points are then kept in fp32. When any expert has an
        act-order ``g_idx``, the others get their trivial one (k // group_size)."""
        weights = list(weights)
        if not weights:
            raise Int4FormatError("no experts to stack", tensor="experts", expected=">= 1", found=0)
        kind = ZeroKind(zero_kind) if zero_kind is not None else widest_zero_kind(weights)
        w0 = weights[0]
        for e, w in enumerate(weights):
            if (w.in_features, w.out_features, w.group_size) != (w0.in_features, w0.out_features,
                                                                 w0.group_size):
                raise Int4FormatError("experts of one projection differ in shape or group size",
                                      tensor=f"experts.{e}",
                                      expected=[w0.out_features, w0.in_features, w0.group_size],
                                      found=[w.out_features, w.in_features, w.group_size])
        mixed_float = kind == ZeroKind.FLOAT and any(w.zero_kind != ZeroKind.FLOAT for w in weights)
        ws = [with_zero_kind(w, kind) for w in weights]
        if mixed_float:
            ws = [replace(w, zeros=w.zeros.to(torch.float32)) for w in ws]
        any_g = any(w.g_idx is not None for w in ws)
        g_idx = None
        if any_g:
            g_idx = torch.stack([w.g_idx.to(torch.int32) if w.g_idx is not None
                                 else (torch.arange(w.in_features, device=w.qweight.device)
                                       // w.group_size).to(torch.int32) for w in ws])
        rows = {tuple(w.scales.shape) for w in ws}
        if len(rows) > 1:
            raise Int4FormatError("experts of one projection have different scale tables",
                                  tensor="experts.scales", expected="one shape",
                                  found=sorted(rows))
        return cls(qweight=torch.stack([w.qweight for w in ws]),
                   scales=torch.stack([w.scales for w in ws]),
                   zeros=None if kind == ZeroKind.NONE else torch.stack([w.zeros for w in ws]),
                   zero_kind=kind, group_size=w0.group_size, in_features=w0.in_features,
                   out_features=w0.out_features, g_idx=g_idx)


def moe_activation(h: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Gated activation of a fused gate_up output [M, 2I] (gate first): act(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "gelu":
        return torch.nn.functional.gelu(gate) * up
    raise Int4FormatError("unsupported MoE activation", tensor="activation",
                          expected=["silu", "gelu"], found=activation)


def reference_moe(x: torch.Tensor, w13: Int4Experts, w2: Int4Experts, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu",
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The MoE oracle: y[m] = Σ_j topk_weights[m, j] · down_e(act(gate_up_e(x[m]))), e =
    topk_ids[m, j], every expert dequantized and computed in ``dtype`` (float64 = test oracle)."""
    y = torch.zeros(x.shape[0], w2.out_features, dtype=dtype, device=x.device)
    xd = x.to(dtype)
    for e in torch.unique(topk_ids).tolist():
        rows, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        h = xd[rows] @ dequantize(w13.expert(e), dtype).t()
        o = moe_activation(h, activation) @ dequantize(w2.expert(e), dtype).t()
        y.index_add_(0, rows, o * topk_weights[rows, slot].to(dtype)[:, None])
    return y


def concat_out_features(parts, name: str = "") -> Int4Weight:
    """Stack weights that share their input along the output dim (an expert's gate and up
    projections -> gate_up): codes and scale/zero columns are concatenated, zero points widened
    to one kind; their act-order g_idx, if any, must be the same (one input permutation)."""
    parts = list(parts)
    kind = widest_zero_kind(parts)
    ws = [with_zero_kind(w, kind) for w in parts]
    if kind == ZeroKind.FLOAT and len({w.zeros.dtype for w in ws}) > 1:
        ws = [replace(w, zeros=w.zeros.to(torch.float32)) for w in ws]
    w0 = ws[0]
    for w in ws[1:]:
        if (w.in_features, w.group_size, w.scales.shape[0]) != (w0.in_features, w0.group_size,
                                                                w0.scales.shape[0]):
            raise Int4FormatError("projections to fuse differ in in_features or groups",
                                  tensor=name, expected=[w0.in_features, w0.group_size],
                                  found=[w.in_features, w.group_size])
        same_g = (w.g_idx is None and w0.g_idx is None) or (
            w.g_idx is not None and w0.g_idx is not None and torch.equal(w.g_idx, w0.g_idx))
        if not same_g:
            raise Int4FormatError("the projections of this fused layer carry different act-order "
                                  "g_idx", tensor=name, expected="one g_idx for all parts",
                                  found="different g_idx")
    return replace(w0, qweight=torch.cat([w.qweight for w in ws], 0),
                   scales=torch.cat([w.scales for w in ws], 1),
                   zeros=None if kind == ZeroKind.NONE else torch.cat([w.zeros for w in ws], 1),
                   out_features=sum(w.out_features for w in ws))
