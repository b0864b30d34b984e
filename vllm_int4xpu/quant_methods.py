"""Weight quantization algorithms beyond round-to-nearest: HQQ and GPTQ (torch only).

Each function takes one dense [N, K] weight and returns the canonical :class:`Int4Weight`; the
model-level driver (which weights, calibration activations, writing) is ``quantizer.py``.

* :func:`quantize_hqq` — half-quadratic quantization (Badri & Shaji, 2023): per group, scales
  from the min/max range, float zero points found by minimising the l_p (p < 1) norm of the
  weight error with a proximal (half-quadratic) solver. No calibration data.
* :func:`quantize_gptq` — GPTQ (Frantar et al., 2022): columns quantized one at a time, the
  rounding error of each spread over the not yet quantized columns through the inverse Hessian
  ``H = X^T X`` of the layer's calibration inputs; group parameters are chosen when a group is
  reached (on the already updated weights) by a clipping search weighted by diag(H); optional
  act-order (columns in order of decreasing diag(H), written as ``g_idx``).
* :func:`asymmetric_target` — the weight GPTQ aims at when the quantized model's inputs differ
  from the float model's (the model-level driver feeds it both: errors of earlier layers are
  compensated, not just this layer's own rounding).

Scales and zero points are rounded to their storage dtype *before* the codes are chosen, so the
stored weight dequantizes to exactly what each objective was evaluated on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import Int4FormatError
from .weight import Int4Weight, ZeroKind, check_quantizable, pack_int4

QMAX = 15
# Float zero points are stored in float32: rounding z to bf16 shifts every weight of the group by
# up to |z| * 2^-9, a bias as large as the mean rounding error of a 64-weight group, and one that
# adds up coherently over a layer's inputs (measured on SmolLM2: 5 % perplexity for HQQ g64).
FLOAT_ZERO_DTYPE = torch.float32


def _round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(torch.float32)


@dataclass
class GroupParams:
    """Scale and zero of each row of one group, in float32 but exactly representable in the
    storage dtype. ``zero`` is an integer code (INT), None (NONE) or the float offset z of
    w = (q - 8) s + z (FLOAT)."""

    scale: torch.Tensor  # [N]
    zero: Optional[torch.Tensor]  # [N]
    kind: ZeroKind

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest codes 0..15 of ``w`` ([N] or [N, c]) under these parameters."""
        s = self.scale if w.dim() == 1 else self.scale[:, None]
        if self.kind == ZeroKind.NONE:
            return torch.clamp(torch.round(w / s) + 8, 0, QMAX)
        z = self.zero if w.dim() == 1 else self.zero[:, None]
        if self.kind == ZeroKind.INT:
            return torch.clamp(torch.round(w / s) + z, 0, QMAX)
        return torch.clamp(torch.round((w - z) / s) + 8, 0, QMAX)

    def dequant(self, q: torch.Tensor) -> torch.Tensor:
        s = self.scale if q.dim() == 1 else self.scale[:, None]
        if self.kind == ZeroKind.NONE:
            return (q - 8) * s
        z = self.zero if q.dim() == 1 else self.zero[:, None]
        if self.kind == ZeroKind.INT:
            return (q - z) * s
        return (q - 8) * s + z


def minmax_params(w: torch.Tensor, kind: ZeroKind, scale_dtype: torch.dtype,
                  shrink: float | torch.Tensor = 1.0) -> GroupParams:
    """Parameters covering [shrink * min, shrink * max] of each row of ``w`` [N, g] (the RTN
    choice at shrink 1; smaller shrink clips outliers)."""
    if not torch.is_tensor(shrink):
        shrink = torch.tensor(shrink)
    if kind == ZeroKind.NONE:
        amax = (w.abs().amax(dim=1) * shrink).clamp_min(1e-8)
        return GroupParams(_round_to(amax / 7.5, scale_dtype), None, kind)
    wmin = (w.amin(dim=1) * shrink).clamp(max=0) if kind == ZeroKind.INT else w.amin(dim=1) * shrink
    wmax = (w.amax(dim=1) * shrink).clamp(min=0) if kind == ZeroKind.INT else w.amax(dim=1) * shrink
    s = _round_to(((wmax - wmin) / QMAX).clamp_min(1e-8), scale_dtype)
    if kind == ZeroKind.INT:
        return GroupParams(s, torch.clamp(torch.round(-wmin / s), 0, QMAX), kind)
    return GroupParams(s, _round_to(wmin + 8.0 * s, FLOAT_ZERO_DTYPE), kind)


def search_params(w: torch.Tensor, kind: ZeroKind, scale_dtype: torch.dtype,
                  col_weight: Optional[torch.Tensor] = None,
                  shrinks: tuple[float, ...] = tuple(1.0 - 0.025 * i for i in range(13)),
                  refits: int = 2) -> GroupParams:
    """Per row, the clipping ratio whose parameters give the least (column-weighted) squared
    error of the group ``w`` [N, g]; ``col_weight`` [g] (e.g. diag of the Hessian) weights the
    columns. Then ``refits`` rounds of least squares: with the codes fixed, the scale (and the
    float zero point) that minimise the weighted error, rounded to the storage dtype, kept
    where they lower it. Ratio 1.0 (min-max) is always a candidate, so this never does worse
    than min-max."""
    cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if col_weight is None else col_weight

    def error(p):
        return ((p.dequant(p.codes(w)) - w) ** 2 * cw).sum(dim=1)

    def pick(better, a, b):
        return GroupParams(torch.where(better, a.scale, b.scale),
                           None if kind == ZeroKind.NONE else torch.where(better, a.zero, b.zero),
                           kind)

    best, best_err = None, None
    for r in shrinks:
        p = minmax_params(w, kind, scale_dtype, r)
        err = error(p)
        if best is None:
            best, best_err = p, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = pick(better, p, best)
    for _ in range(refits):
        p = _least_squares_refit(w, best, cw, scale_dtype)
        err = error(p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = pick(better, p, best)
    return best


def _least_squares_refit(w: torch.Tensor, p: GroupParams, cw: torch.Tensor,
                         scale_dtype: torch.dtype) -> GroupParams:
    """With the codes of ``p`` fixed, the weighted least-squares scale (and float zero point;
    integer zero points stay) of each row, rounded to the storage dtype."""
    q = p.codes(w)
    if p.kind == ZeroKind.FLOAT:  # w ≈ u s + z, u = q - 8: a 2x2 normal system per row
        u = q - 8
        s_uu, s_u, s_1 = (cw * u * u).sum(1), (cw * u).sum(1), cw.sum().expand(u.shape[0])
        s_uw, s_w = (cw * u * w).sum(1), (cw * w).sum(1)
        det = s_uu * s_1 - s_u * s_u
        ok = det.abs() > 1e-12 * s_uu.clamp_min(1e-30) * s_1
        scale = torch.where(ok, (s_uw * s_1 - s_u * s_w) / torch.where(ok, det, 1.0), p.scale)
        zero = torch.where(ok, (s_uu * s_w - s_u * s_uw) / torch.where(ok, det, 1.0), p.zero)
        ok &= scale > 0
        return GroupParams(torch.where(ok, _round_to(scale.clamp_min(1e-8), scale_dtype), p.scale),
                           torch.where(ok, _round_to(zero, FLOAT_ZERO_DTYPE), p.zero), p.kind)
    u = q - (8 if p.kind == ZeroKind.NONE else p.zero[:, None])
    den = (cw * u * u).sum(1)
    scale = (cw * u * w).sum(1) / den.clamp_min(1e-30)
    ok = (den > 0) & (scale > 0)
    return GroupParams(torch.where(ok, _round_to(scale.clamp_min(1e-8), scale_dtype), p.scale),
                       p.zero, p.kind)


def _assemble(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
              kind: ZeroKind, g: int, scale_dtype: torch.dtype,
              g_idx: Optional[torch.Tensor] = None) -> Int4Weight:
    """codes [N, K] in 0..15, scales/zeros [G, N] -> Int4Weight."""
    N, K = codes.shape
    if kind == ZeroKind.INT:
        zeros = zeros.to(torch.int8).contiguous()
    elif kind == ZeroKind.FLOAT:
        zeros = zeros.to(FLOAT_ZERO_DTYPE).contiguous()
    return Int4Weight(qweight=pack_int4(codes.to(torch.int32)),
                      scales=scales.to(scale_dtype).contiguous(), zeros=zeros, zero_kind=kind,
                      group_size=g, in_features=K, out_features=N,
                      g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous())


# ----------------------------------------------------------------------------------------- HQQ
def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p (generalised soft threshold): shrink |x| by |x|^(p-1) / beta."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


def quantize_hqq(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16,
                 iters: int = 20, lp: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                 ) -> Int4Weight:
    """Half-quadratic quantization with float zero points (see the module docstring).

    Works in the code domain: q = round(w / s + c), w ≈ (q - c) s, with s from the group's
    min/max range fixed and the zero c optimised. Each iteration: codes for the current c; the
    sparse error e = shrink_lp(w - (q - c) s) (the half-quadratic split of ||w - w_q||_p^p);
    c = mean(q - (w - e) / s), the closed-form minimiser of the quadratic part; beta grows by
    kappa. The iterate with the least mean |w - w_q| is kept; finally its float zero point
    z = (8 - c) s moves by the group's mean error, which makes that mean zero.
    """
    N, K, g = check_quantizable(weight, group_size)
    w = weight.detach().to(torch.float32).reshape(-1, g)  # rows = (n, group)
    start = minmax_params(w, ZeroKind.FLOAT, scale_dtype)
    s = start.scale[:, None]
    c = 8.0 - start.zero[:, None] / s  # code-domain zero of the min-max start

    def evaluate(c):
        p = GroupParams(start.scale, _round_to(((8.0 - c) * s).squeeze(1), FLOAT_ZERO_DTYPE),
                        ZeroKind.FLOAT)
        q = p.codes(w)
        return p, q, (p.dequant(q) - w).abs().mean(dim=1)

    best_p, best_q, best_err = evaluate(c)
    for _ in range(iters):
        q = torch.clamp(torch.round(w / s + c), 0, QMAX)
        e = _shrink_lp(w - (q - c) * s, beta, lp)
        c = (q - (w - e) / s).mean(dim=1, keepdim=True)
        beta *= kappa
        p, q, err = evaluate(c)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[:, None], q, best_q)
        best_p = GroupParams(best_p.scale, torch.where(better, p.zero, best_p.zero), ZeroKind.FLOAT)
    # The sparse error term leaves the kept iterate with a small mean error per group; with the
    # codes fixed, moving z by that mean makes it zero (the l2-optimal zero for these codes), so
    # the group adds no bias to the layer's outputs.
    zero = best_p.zero + (w - best_p.dequant(best_q)).mean(dim=1)
    G = K // g
    return _assemble(best_q.reshape(N, K), best_p.scale.reshape(N, G).t(),
                     zero.reshape(N, G).t(), ZeroKind.FLOAT, g, scale_dtype)


# ---------------------------------------------------------------------------------------- GPTQ
@dataclass
class PreparedHessian:
    """What GPTQ needs from one Hessian, computed once for all weights that share it (q/k/v):
    the upper Cholesky factor of the damped inverse, diag(H), dead columns, act-order perm."""

    U: torch.Tensor  # [K, K] float32, in processing order
    diag: torch.Tensor  # [K] float32 diag(H) before damping, in processing order
    dead: torch.Tensor  # [K] bool, original order
    perm: Optional[torch.Tensor]  # processing order (act-order) or None


def prepare_hessian(hessian: torch.Tensor, act_order: bool = False,
                    damp: float = 0.01) -> PreparedHessian:
    """``damp`` adds ``damp * mean(diag H)`` to the diagonal; columns whose inputs never fire
    (H_kk = 0) get H_kk = 1 (their weights are zeroed); with ``act_order`` the columns are
    processed by decreasing H_kk."""
    H, dead = _live_hessian(hessian)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    diag = torch.diag(H).clone()
    _add_damping(H, damp)
    return PreparedHessian(_inverse_cholesky_upper(H).to(torch.float32), diag.to(torch.float32),
                           dead, perm)


def _live_hessian(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 copy of H with H_kk = 1 where the input never fires (H_kk = 0), and that mask."""
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def _add_damping(H: torch.Tensor, damp: float) -> None:
    """H += damp * mean(diag H) * I, in place."""
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def asymmetric_correction(hessian: torch.Tensor, cross: torch.Tensor,
                          damp: float = 0.01) -> torch.Tensor:
    """M [K, K] float64 such that :func:`asymmetric_target` is W + W M, for every weight that
    reads the same input (q/k/v share one): M = (C − H) H⁻¹, H damped as
    :func:`prepare_hessian` does; rows and columns of inputs that never fire are zero."""
    D = cross.to(torch.float64) - hessian.detach().to(torch.float64)  # Σ (x_fp − x)ᵀ x
    Hd, dead = _live_hessian(hessian)
    _add_damping(Hd, damp)
    M = torch.cholesky_solve(D.t(), torch.linalg.cholesky(Hd)).t()  # D Hd⁻¹ (Hd symmetric)
    M[:, dead] = 0.0
    return M


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                      damp: float = 0.01, correction: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """The weight W* [N, K] whose outputs on the quantized model's inputs x best match the float
    model's outputs on its own inputs x_fp: the minimiser of ‖x W*ᵀ − x_fp Wᵀ‖², written as
    W* = W + W (C − H) H⁻¹ with H = Σ xᵀx (``hessian``, damped as :func:`prepare_hessian`
    does, in the correction only) and C = Σ x_fpᵀ x (``cross``), so W* = W exactly where the
    two inputs agree. GPTQ on W* with H then minimises ‖x Ŵᵀ − x_fp Wᵀ‖² (the "asymmetric
    calibration" of GPTAQ, Li et al. 2025). Columns whose inputs never fire stay as they are.
    ``correction``: :func:`asymmetric_correction` of the same H and C, computed once."""
    M = asymmetric_correction(hessian, cross, damp) if correction is None else correction
    W = weight.detach().to(torch.float64)
    return (W + W @ M).to(torch.float32)


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, group_size: int,
                  zero_kind: ZeroKind | str = ZeroKind.INT, scale_dtype: torch.dtype = torch.bfloat16,
                  act_order: bool = False, block_size: int = 128, damp: float = 0.01,
                  clip_search: bool = True) -> Int4Weight:
    """GPTQ of one [N, K] weight given the Hessian ``H`` [K, K] (∝ Σ x xᵀ of its inputs), or
    its :func:`prepare_hessian` (then ``act_order`` and ``damp`` are the prepared ones). With
    act-order each run of ``group_size`` processed columns shares one group, recorded in
    ``g_idx``."""
    N, K, g = check_quantizable(weight, group_size)
    kind = ZeroKind(zero_kind)
    found = hessian.shape if torch.is_tensor(hessian) else hessian.U.shape
    if tuple(found) != (K, K):
        raise Int4FormatError("Hessian does not match the weight", tensor="hessian",
                              expected=[K, K], found=list(found))
    prep = prepare_hessian(hessian, act_order, damp) if torch.is_tensor(hessian) else hessian
    W = weight.detach().to(torch.float32).clone()
    W[:, prep.dead] = 0.0
    if prep.perm is not None:
        W = W[:, prep.perm]
    with _single_thread():  # the column loop is many small ops: threads only add sync overhead
        codes, scales, zeros = _gptq_columns(W, prep.U, prep.diag, g, kind, scale_dtype,
                                             block_size, clip_search)
    g_idx = None
    if prep.perm is not None:
        inv = torch.argsort(prep.perm)
        codes = codes[:, inv]
        g_idx = (torch.arange(K) // g)[inv]
    return _assemble(codes, scales, zeros, kind, g, scale_dtype, g_idx)


@contextlib.contextmanager
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gptq_columns(W, U, diag32, g, kind, scale_dtype, block_size, clip_search):
    """GPTQ's blocked column loop on W [N, K] (updated in place) with U = chol(H⁻¹) upper."""
    N, K = W.shape
    G = K // g
    codes = torch.zeros(N, K, dtype=torch.float32)
    scales = torch.empty(G, N)
    zeros = None if kind == ZeroKind.NONE else torch.empty(G, N)
    params: Optional[GroupParams] = None
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if col % g == 0:
                # parameters of the group starting here, from the weights as updated so far
                gw = torch.cat([W1[:, j:], W[:, i2:]], dim=1)[:, :g]
                params = (search_params(gw, kind, scale_dtype, diag32[col:col + g]) if clip_search
                          else minmax_params(gw, kind, scale_dtype))
                scales[col // g] = params.scale
                if zeros is not None:
                    zeros[col // g] = params.zero
            w = W1[:, j]
            q = params.codes(w)
            codes[:, col] = q
            err = (w - params.dequant(q)) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, scales, zeros


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹; adds more damping if H is not positive definite."""
    extra = 0.0
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(H + extra * torch.eye(H.shape[0], dtype=H.dtype))
            # H⁻¹ = L⁻ᵀ L⁻¹ from one triangular inverse (cholesky_inverse is ~4x slower on CPU)
            Linv = torch.linalg.solve_triangular(L, torch.eye(H.shape[0], dtype=H.dtype),
                                                 upper=False)
            return torch.linalg.cholesky(Linv.t() @ Linv, upper=True)
        except RuntimeError:
            extra = max(extra * 10, 1e-6 * float(torch.diag(H).mean()))
    raise Int4FormatError("calibration Hessian is not positive definite even with damping",
                          tensor="hessian", expected="positive definite", found="singular")


def reconstruction_error(weight: torch.Tensor, qweight_dense: torch.Tensor,
                         x: torch.Tensor) -> float:
    """‖x Wᵀ − x Ŵᵀ‖² / ‖x Wᵀ‖² in float64: GPTQ's objective on calibration inputs ``x``."""
    x64 = x.to(torch.float64)
    ref = x64 @ weight.to(torch.float64).t()
    return float(((ref - x64 @ qweight_dense.to(torch.float64).t()) ** 2).sum() / (ref ** 2).sum())
