"""Fused int4 mixture-of-experts: one launch per expert GEMM for all experts, then a small reduce.

Rows are (token, slot) *pairs* p = m * top_k + j, P = M * top_k of them; pair p goes to expert
``topk_ids.flat[p]``. Up to three launches per layer (plus the token sort's three on the dot
path), none of which reads anything on the host:

1. gate_up (``GATED``): h[p, n] = act(x[m] . W13_e[n]) * (x[m] . W13_e[I + n]), h [P, I] in the
   activation dtype, rows in pair order;
2. down: ws[s, p, :] = topk_weights.flat[p] * (h[p] . W2_e) over K split s ([S, P, H]: fp32 on
   the gemv path, the activation dtype on the dot path); with SERIAL (gemv), the last of a
   token's TOP_K * S arrivals also sums them into y (:func:`_down_epilogue`) and 3. is skipped;
3. :func:`moe_reduce_kernel`: y[m] = sum over splits and the top_k slots of m, in a fixed order
   (deterministic: no atomic adds; SERIAL counts arrivals atomically but sums in this order).

Two paths for the GEMMs (chosen by ``moe_triton.choose_moe_config`` from pairs per expert):

* **gemv** (:func:`moe_gemv_kernel`, decode): one program per (N tile, pair, K split) on CUDA
  cores; a pair reads its expert id itself, so no token sort is needed (``SORTED`` walks the pairs
  in expert order instead, so programs on the same expert run together and share its weight
  through L2). Nibbles (2p+1, 2p) come from one shift as 1 + q/16 and 1 + q/256
  (``common.nibble_pair_as_float``), so a weight costs ~half a shift, one LOP3 and one FMA; the
  group's scale and offset are applied once per K tile. A K tile may hold several whole groups
  (:func:`_gemv_multi_group`: power-of-two groups, K a multiple of the tile), which keeps more
  weight words in flight per thread than one group of 128 does. With ``SERIAL`` the down
  GEMM's programs count their arrivals per (token, N tile) and the last one sums the token's
  partials in the reduce kernel's order (so the result is the same, bit for bit), which saves
  the reduce launch at decode.
* **dot** (:func:`moe_dot_kernel`, prefill): tokens sorted by expert into blocks of BLOCK_M
  (:func:`sort_pairs_triton`, whose torch twin :func:`sort_pairs` is the test oracle; padded,
  fixed sizes), one program per (N tile, block, K split), the weight tile dequantized in
  registers and multiplied on tensor cores with the linear GEMM's tile
  (``gemm._tile_dot``: FRAG 2 packed dequantization on CUDA, FRAG 1 elsewhere). Blocks past the
  padded count return at once, so experts without tokens cost one early exit per N tile. The
  fragment order's permuted k is applied to A outside the K loop where the row allows (X_FRAG):
  gate_up writes h in the down GEMM's order (``out_order``) and x can be gathered into gate_up's
  order once (``XPERM``), so x goes from the pipelined shared-memory buffer to the MMA as loaded.

Program order (both paths, ``GROUP_M``, :func:`_tile_ids`): the grid is one linear axis of
(N tile, row) programs (rows are pairs or blocks), K splits on the second; GROUP_M rows walk
the N tiles together, so rows on the same expert that run at the same time read each weight
tile from memory once and share it through L2 (GROUP_M 1: all N tiles of a row, then the next).

Weights are the canonical layout stacked per expert (qweight [E, N, K/8], scales/zeros [E, G, N]);
act-order weights were permuted per expert at load so groups are contiguous, and both kernels
read A's columns through ``perm[e]`` (x's channels for gate_up, h's for down). A K tile never
straddles a group boundary (the launcher clips BLOCK_K, or makes it a whole number of groups).
Intel's Triton backend runs the same code (no inline PTX except behind FRAG 2's USE_ASM, which
the launcher enables on CUDA only).
"""

import functools

import torch
import triton
import triton.language as tl

from .common import (MAX_TILES, ONE_BITS, group_of, group_scale_offset, group_shift,
                     interpreting, nibble_pair_as_float, pdl_launch_next, pdl_launch_option,
                     pdl_wait, tile_counters, use_pdl)
from .gemm import _frag_position, _frag_rows, _group_affine, _tile_dot, frag_positions


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(gate) in fp32: 0 silu, 1 gelu (erf form, as torch's default)."""
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    else:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))


@triton.jit
def _x_planes(a_row, perm_e, k, K, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 x at channels k and k + 1 (through perm[e] with act-order)."""
    k_ok = (k < K) | EVEN_K
    if HAS_PERM:
        src_lo = tl.load(perm_e + k, mask=k_ok, other=0)
        src_hi = tl.load(perm_e + k + 1, mask=k_ok, other=0)
    else:
        src_lo = k
        src_hi = k + 1
    x_lo = tl.load(a_row + src_lo, mask=k_ok, other=0.0).to(tl.float32)
    x_hi = tl.load(a_row + src_hi, mask=k_ok, other=0.0).to(tl.float32)
    return x_lo, x_hi


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(N tile, row index) of the linear program id ``pid`` over num_m rows (pairs or blocks)
    and num_n N tiles: GROUP_M rows walk the N tiles together, the row fastest, so programs that
    run at the same time on one expert read each weight tile once from memory and share it
    through L2 (GROUP_M 1: every N tile of a row, then the next row)."""
    if GROUP_M == 1:
        return pid % num_n, pid // num_n
    per_group = GROUP_M * num_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(num_m - first, GROUP_M)
    r = pid % per_group
    return r // size, first + r % size


@triton.jit
def moe_gemv_kernel(a_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, y_ptr, cnt_ptr, ids_ptr,
                    order_ptr, topw_ptr, P, N, K, GROUP, stride_am, stride_qe, stride_qn,
                    stride_se, stride_pe, one_bits, A_DIV: tl.constexpr, GATED: tl.constexpr,
                    ACT: tl.constexpr, SORTED: tl.constexpr, ZERO_KIND: tl.constexpr,
                    HAS_PERM: tl.constexpr, SPLIT_K: tl.constexpr, SERIAL: tl.constexpr,
                    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, GROUP_SHIFT: tl.constexpr, GPT: tl.constexpr,
                    GROUP_M: tl.constexpr, PDL: tl.constexpr, PDL_EARLY: tl.constexpr,
                    PREFETCH: tl.constexpr):
    """One (N tile, pair, K split). GATED: out [P, N] = act(gate) * up (N = I, weight rows n and
    N + n); else out fp32 [SPLIT_K, P, N] = router weight * partial sum (:func:`_down_epilogue`;
    with SERIAL the last arrival also writes y). A K tile spans GPT whole groups (GPT > 1 only
    for power-of-two groups and K a multiple of BLOCK_K)."""
    pid_n, pid_p = _tile_ids(tl.program_id(0), P, tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    if SORTED:
        pair = tl.load(order_ptr + pid_p)
    else:
        pair = pid_p
    e = tl.load(ids_ptr + pair).to(tl.int64)
    if GATED and PDL_EARLY:
        pdl_launch_next(PDL)  # down's programs may start now and fetch their weights
    if not GATED and not PREFETCH:
        pdl_wait(PDL)  # down reads h (gate_up's output) from here on
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    BW: tl.constexpr = BLOCK_K // 8
    offs_w = tl.arange(0, BW)
    NS = N * 2 if GATED else N  # scale row length (gate_up has 2I rows)
    w_rows = qw_ptr + e * stride_qe + offs_n[:, None].to(tl.int64) * stride_qn
    s_e = s_ptr + e * stride_se
    z_e = z_ptr + e * stride_se
    a_row = a_ptr + (pair // A_DIV).to(tl.int64) * stride_am
    perm_e = perm_ptr + e * stride_pe
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    if GPT > 1:
        acc, acc_u = _gemv_multi_group(acc, acc_u, w_rows, s_e, z_e, a_row, perm_e, k_lo, k_hi,
                                       offs_n, n_mask, N, NS, stride_qn, one_bits, GATED,
                                       ZERO_KIND, HAS_PERM, BLOCK_N, BLOCK_K, GPT, GROUP_SHIFT,
                                       PDL, PREFETCH)
        k_hi = k_lo  # done: skip the one-group loop below
    PF1: tl.constexpr = PREFETCH and GPT == 1
    if PF1:  # down: its first weight tile is fetched before waiting for h
        wk = k_lo // 8 + offs_w
        words_nx = tl.load(w_rows + wk[None, :], other=0, mask=n_mask[:, None] & (
            ((wk < K // 8) | EVEN_K) & (tl.zeros([BW], dtype=tl.int32) + k_lo < k_hi))[None, :])
        pdl_wait(PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        wk = k0 // 8 + offs_w
        wmask = n_mask[:, None] & ((wk < K // 8) | EVEN_K)[None, :]
        if PF1:
            words = words_nx
            wk1 = wk + BLOCK_K // 8
            more = tl.zeros([BW], tl.int32) + k0 + BLOCK_K < k_hi  # a uniform mask
            words_nx = tl.load(w_rows + wk1[None, :], other=0, mask=n_mask[:, None] & (
                ((wk1 < K // 8) | EVEN_K) & more)[None, :])
        else:
            words = tl.load(w_rows + wk[None, :], mask=wmask, other=0)
        if GATED:
            words_u = tl.load(w_rows + N * stride_qn + wk[None, :], mask=wmask, other=0)
        # Nibble j of word w is channel k0 + 8 w + j. Nibbles (2p+1, 2p) come from one shift as
        # hi = 1 + q/16 and lo = 1 + q/256; against 16 x and 256 x each term is 16 x + q x
        # (256 x + q x), so sum q x = sum t - sum(16 x_odd + 256 x_even), once per tile.
        t = tl.zeros([BLOCK_N, BW], dtype=tl.float32)
        t_u = tl.zeros([BLOCK_N, BW], dtype=tl.float32)
        x_scaled = tl.zeros([BW], dtype=tl.float32)
        x_plain = tl.zeros([BW], dtype=tl.float32)
        for p in tl.static_range(4):
            x_lo, x_hi = _x_planes(a_row, perm_e, k0 + 8 * offs_w + 2 * p, K, HAS_PERM, EVEN_K)
            x_lo256 = x_lo * 256.0
            x_hi16 = x_hi * 16.0
            hi, lo = nibble_pair_as_float(words, p, one_bits)
            t += hi * x_hi16[None, :]
            t += lo * x_lo256[None, :]
            if GATED:
                hi_u, lo_u = nibble_pair_as_float(words_u, p, one_bits)
                t_u += hi_u * x_hi16[None, :]
                t_u += lo_u * x_lo256[None, :]
            x_scaled += x_hi16 + x_lo256
            x_plain += x_hi + x_lo
        xs = tl.sum(x_scaled, 0)
        xp = tl.sum(x_plain, 0)
        g = group_of(k0, GROUP, GROUP_SHIFT)
        s, b = group_scale_offset(s_e, z_e, g, offs_n, n_mask, NS, ZERO_KIND)
        acc += s * (tl.sum(t, 1) - xs) + b * xp
        if GATED:
            s_u, b_u = group_scale_offset(s_e, z_e, g, offs_n + N, n_mask, NS, ZERO_KIND)
            acc_u += s_u * (tl.sum(t_u, 1) - xs) + b_u * xp
    if GATED:
        if not PDL_EARLY:
            pdl_launch_next(PDL)  # down's programs may take the slots this grid's tail frees
        h = _act(acc, ACT) * acc_u
        tl.store(out_ptr + pair.to(tl.int64) * N + offs_n, h.to(out_ptr.dtype.element_ty),
                 mask=n_mask)
    else:
        wt = tl.load(topw_ptr + pair)
        pairs = pair + tl.zeros([1], dtype=tl.int32)
        _down_epilogue((acc * wt)[None, :], pairs, pairs >= 0, offs_n, n_mask, out_ptr, y_ptr,
                       cnt_ptr, pid_n, pid_k, P, N, tl.cdiv(N, BLOCK_N), TOP_K, SPLIT_K, SERIAL)


@triton.jit
def _gemv_multi_group(acc, acc_u, w_rows, s_e, z_e, a_row, perm_e, k_lo, k_hi, offs_n, n_mask,
                      N, NS, stride_qn, one_bits, GATED: tl.constexpr, ZERO_KIND: tl.constexpr,
                      HAS_PERM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GPT: tl.constexpr, GROUP_SHIFT: tl.constexpr, PDL: tl.constexpr,
                      PREFETCH: tl.constexpr):
    """:func:`moe_gemv_kernel`'s K loop with tiles of GPT groups: the weight words are held
    groups-outer, [GPT, BLOCK_N, words per group], so each group's partial sums reduce on their own
    axis and meet their scale and offset once per tile (more words in flight per thread than
    one-group tiles of small groups allow), and the load layout spreads a warp's lanes over the
    groups and words of a row and repeats rows in each thread, so each x value a thread converts
    serves several rows (rows-outer, [BLOCK_N, GPT, words], each thread held one row: 7-24 % more
    instructions per K tile on sm_90 and 2-5 % slower on an H100, BENCHMARKS.md). K is a
    multiple of BLOCK_K (no masks along K)."""
    SW: tl.constexpr = BLOCK_K // 8 // GPT  # words per group
    offs_g = tl.arange(0, GPT)
    offs_s = tl.arange(0, SW)
    wofs = offs_g[:, None] * SW + offs_s[None, :]  # [GPT, SW] word offsets in the tile
    nm3 = n_mask[None, :, None]
    rows3 = w_rows[None, :, :]  # [1, BLOCK_N, 1]
    if PREFETCH:  # down (see moe_gemv_kernel)
        wk = (k_lo // 8 + wofs)[:, None, :]
        words_nx = tl.load(rows3 + wk, other=0,
                           mask=nm3 & (tl.zeros([1, 1, 1], tl.int32) + k_lo < k_hi))
        pdl_wait(PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        wk = (k0 // 8 + wofs)[:, None, :]
        if PREFETCH:
            words = words_nx
            wk1 = wk + BLOCK_K // 8
            words_nx = tl.load(rows3 + wk1, other=0,
                               mask=nm3 & (tl.zeros([1, 1, 1], tl.int32) + k0 + BLOCK_K < k_hi))
        else:
            words = tl.load(rows3 + wk, mask=nm3, other=0)
        if GATED:
            words_u = tl.load(rows3 + N * stride_qn + wk, mask=nm3, other=0)
        t = tl.zeros([GPT, BLOCK_N, SW], dtype=tl.float32)
        t_u = tl.zeros([GPT, BLOCK_N, SW], dtype=tl.float32)
        x_scaled = tl.zeros([GPT, SW], dtype=tl.float32)
        x_plain = tl.zeros([GPT, SW], dtype=tl.float32)
        for p in tl.static_range(4):
            x_lo, x_hi = _x_planes(a_row, perm_e, k0 + 8 * wofs + 2 * p, k_hi, HAS_PERM, True)
            x_lo256 = x_lo * 256.0
            x_hi16 = x_hi * 16.0
            hi, lo = nibble_pair_as_float(words, p, one_bits)
            t += hi * x_hi16[:, None, :]
            t += lo * x_lo256[:, None, :]
            if GATED:
                hi_u, lo_u = nibble_pair_as_float(words_u, p, one_bits)
                t_u += hi_u * x_hi16[:, None, :]
                t_u += lo_u * x_lo256[:, None, :]
            x_scaled += x_hi16 + x_lo256
            x_plain += x_hi + x_lo
        xs = tl.sum(x_scaled, 1)[:, None]  # [GPT, 1]
        xp = tl.sum(x_plain, 1)[:, None]
        g = ((k0 >> GROUP_SHIFT) + offs_g)[:, None]
        s, b = group_scale_offset(s_e, z_e, g, offs_n[None, :], n_mask[None, :], NS, ZERO_KIND)
        acc += tl.sum(s * (tl.sum(t, 2) - xs) + b * xp, 0)
        if GATED:
            s_u, b_u = group_scale_offset(s_e, z_e, g, offs_n[None, :] + N, n_mask[None, :], NS,
                                          ZERO_KIND)
            acc_u += tl.sum(s_u * (tl.sum(t_u, 2) - xs) + b_u * xp, 0)
    return acc, acc_u


@triton.jit
def _down_epilogue(res, pairs, valid, offs_n, n_mask, ws_ptr, y_ptr, cnt_ptr, pid_n, pid_k, P,
                   N, n_tiles, TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, SERIAL: tl.constexpr):
    """Down GEMM's end for rows ``pairs`` [R] (``res`` [R, BN] fp32, router weight applied):
    store the partial to ws fp32 [SPLIT_K, P, N]; with SERIAL, also count the arrival on the
    (token, N tile) counter, and the TOP_K * SPLIT_K-th arrival sums that token's partials in a
    fixed order (deterministic), writes y[token] and resets the counter (no reduce launch)."""
    mask = valid[:, None] & n_mask[None, :]
    tl.store(ws_ptr + (pid_k * P + pairs[:, None]).to(tl.int64) * N + offs_n[None, :], res,
             mask=mask)
    if SERIAL:
        tl.debug_barrier()  # every partial store of this program is issued before the release
        tok = pairs // TOP_K
        cnt = cnt_ptr + tok * n_tiles + pid_n
        old = tl.atomic_add(cnt, 1, mask=valid, sem="acq_rel", scope="gpu")
        last = valid & (old == TOP_K * SPLIT_K - 1)
        if tl.sum(last.to(tl.int32), 0) > 0:
            lmask = last[:, None] & n_mask[None, :]
            tot = tl.zeros_like(res)
            for s in tl.static_range(SPLIT_K):
                for j in tl.static_range(TOP_K):
                    row = (s * P + tok * TOP_K + j).to(tl.int64)
                    tot += tl.load(ws_ptr + row[:, None] * N + offs_n[None, :], mask=lmask,
                                   other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + tok[:, None].to(tl.int64) * N + offs_n[None, :],
                     tot.to(y_ptr.dtype.element_ty), mask=lmask)
            tl.atomic_xchg(cnt, 0, mask=last, sem="relaxed", scope="gpu")


@triton.jit
def moe_dot_kernel(a_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, sorted_ptr, block_expert_ptr,
                   npad_ptr, topw_ptr, P, N, K, GROUP, stride_am, stride_qe, stride_qn,
                   stride_se, stride_pe, one_bits, A_DIV: tl.constexpr, GATED: tl.constexpr,
                   ACT: tl.constexpr, ZERO_KIND: tl.constexpr, HAS_PERM: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, GROUP_SHIFT: tl.constexpr,
                   FRAG: tl.constexpr, NUM_WARPS: tl.constexpr, USE_ASM: tl.constexpr,
                   IEEE: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr,
                   X_FRAG: tl.constexpr, OUT_BK: tl.constexpr, OUT_PACKED: tl.constexpr):
    """One (N tile, block of BLOCK_M sorted pairs of one expert, K split); outputs as
    :func:`moe_gemv_kernel`. Accumulators are transposed, [BN, BM] (see gemm.py). X_FRAG: A's
    columns are already in this launch's fragment order (no per-tile permute of x); OUT_BK
    (gated): h's columns are written in the fragment order of the down GEMM's K tiles of OUT_BK
    (OUT_PACKED: FRAG 2's order), which its X_FRAG then reads."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n, pid_m = _tile_ids(tl.program_id(0), tl.num_programs(0) // n_tiles, n_tiles, GROUP_M)
    pid_k = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return  # past the last padded block: no work (experts without tokens have no block)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < P
    rows = tl.where(valid, rows, 0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if not GATED:
        pdl_wait(PDL)  # down reads h (gate_up's output) from here on
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if FRAG:  # weight rows in the order the load layout holds them (gemm._frag_rows)
        offs_nl = pid_n * BLOCK_N + _frag_rows(BLOCK_N, NUM_WARPS)
    else:
        offs_nl = offs_n
    nl_mask = offs_nl < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    NS = N * 2 if GATED else N
    w_rows = qw_ptr + e * stride_qe + offs_nl[:, None].to(tl.int64) * stride_qn
    s_e = s_ptr + e * stride_se
    z_e = z_ptr + e * stride_se
    perm_e = perm_ptr + e * stride_pe
    a_rows = a_ptr + (rows // A_DIV).to(tl.int64)[:, None] * stride_am
    PACKED: tl.constexpr = FRAG == 2
    MAGIC: tl.constexpr = 1024.0 if a_ptr.dtype.element_ty == tl.float16 else 128.0
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xk = k0 + offs_k
        k_ok = (xk < K) | EVEN_K
        if HAS_PERM:
            xk = tl.load(perm_e + xk, mask=k_ok, other=0)
        x = tl.load(a_rows + xk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        wk = k0 // 8 + offs_w
        wmask = nl_mask[:, None] & ((wk < K // 8) | EVEN_K)[None, :]
        g = group_of(k0, GROUP, GROUP_SHIFT)
        words = tl.load(w_rows + wk[None, :], mask=wmask, other=0)
        s, b, c = _group_affine(s_e, z_e, g, offs_nl, nl_mask, NS, ZERO_KIND, PACKED, MAGIC)
        acc = _tile_dot(acc, words, x, s, b, c, one_bits, BLOCK_N, BLOCK_K, BLOCK_M, FRAG,
                        NUM_WARPS, USE_ASM, IEEE, MAGIC, X_FRAG)
        if GATED:
            words_u = tl.load(w_rows + N * stride_qn + wk[None, :], mask=wmask, other=0)
            s_u, b_u, c_u = _group_affine(s_e, z_e, g, offs_nl + N, nl_mask, NS, ZERO_KIND,
                                          PACKED, MAGIC)
            acc_u = _tile_dot(acc_u, words_u, x, s_u, b_u, c_u, one_bits, BLOCK_N, BLOCK_K,
                              BLOCK_M, FRAG, NUM_WARPS, USE_ASM, IEEE, MAGIC, X_FRAG)
    mask = n_mask[:, None] & valid[None, :]
    if GATED:
        pdl_launch_next(PDL)
        h = _act(acc, ACT) * acc_u
        if OUT_BK:  # in the down GEMM's fragment order (N a multiple of OUT_BK)
            cols = offs_n - offs_n % OUT_BK + _frag_position(offs_n % OUT_BK, OUT_BK, OUT_PACKED)
        else:
            cols = offs_n
        offs = rows[None, :].to(tl.int64) * N + cols[:, None]
        tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        wt = tl.load(topw_ptr + rows, mask=valid, other=0.0)
        offs = (pid_k * P + rows[None, :]).to(tl.int64) * N + offs_n[:, None]
        tl.store(out_ptr + offs, (acc * wt[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_reduce_kernel(ws_ptr, y_ptr, M, N, TOP_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK: tl.constexpr):
    """y[m, n] = sum_s sum_j ws[s, m * TOP_K + j, n] (in fp32, fixed order), cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    m = offs // N
    n = offs % N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        for j in tl.static_range(TOP_K):
            acc += tl.load(ws_ptr + ((s * M + m) * TOP_K + j).to(tl.int64) * N + n, mask=mask,
                           other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ launchers
def sort_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Group the P = M * top_k pairs by expert into blocks of ``block_m`` rows, with torch ops of
    fixed output sizes only (no host sync: CUDA-graph safe).

    Returns (sorted [P + E (block_m - 1)] int32: pair ids, each expert's run padded to a multiple
    of block_m with the sentinel P; block_expert [max blocks] int32: expert of each block;
    npad [1] int32: padded row count; blocks past it are not used)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    P = flat.numel()
    dev = flat.device
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    # destination of the i-th pair in expert order: its expert's padded start + rank in expert
    e_sorted = flat[order]
    start_sorted = torch.cumsum(counts, 0) - counts
    dest = (ends - padded)[e_sorted] + torch.arange(P, device=dev) - start_sorted[e_sorted]
    sorted_ids = torch.full((P + num_experts * (block_m - 1),), P, dtype=torch.int32,
                            device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    n_blocks = max_blocks(P, num_experts, block_m)
    starts = torch.arange(n_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32), ends[-1:].to(torch.int32)


@triton.jit
def sort_count_kernel(ids_ptr, hist_ptr, P, E, CH: tl.constexpr, E_BLOCK: tl.constexpr):
    """hist[c, e] = pairs of chunk c (CH pairs) routed to expert e."""
    c = tl.program_id(0)
    offs = c * CH + tl.arange(0, CH)
    ok = offs < P
    ids = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
    h = tl.histogram(ids, E_BLOCK)
    # masked-out slots were counted in bin 0
    h -= tl.where(tl.arange(0, E_BLOCK) == 0, CH - tl.sum(ok.to(tl.int32), 0), 0)
    offs_e = tl.arange(0, E_BLOCK)
    tl.store(hist_ptr + c * E + offs_e, h, mask=offs_e < E)


@triton.jit
def sort_offsets_kernel(hist_ptr, sorted_ptr, block_expert_ptr, npad_ptr, P, E, n_chunks,
                        n_blocks, BM: tl.constexpr, E_BLOCK: tl.constexpr, R: tl.constexpr,
                        BB: tl.constexpr):
    """One program: per expert, its padded run [start, end) in sorted order (runs in expert
    order, each padded to a multiple of BM); hist[c, e] becomes the slot of chunk c's first
    pair of expert e (start + pairs of e in earlier chunks); the padding gets the sentinel P;
    block_expert and npad as :func:`sort_pairs`."""
    offs_e = tl.arange(0, E_BLOCK)
    e_ok = offs_e < E
    counts = tl.zeros([E_BLOCK], dtype=tl.int32)
    for r0 in range(0, n_chunks, R):
        rows = r0 + tl.arange(0, R)
        m = (rows < n_chunks)[:, None] & e_ok[None, :]
        counts += tl.sum(tl.load(hist_ptr + rows[:, None] * E + offs_e[None, :], mask=m,
                                 other=0), 0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    for r0 in range(0, n_chunks, R):
        rows = r0 + tl.arange(0, R)
        m = (rows < n_chunks)[:, None] & e_ok[None, :]
        ptrs = hist_ptr + rows[:, None] * E + offs_e[None, :]
        blk = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, starts[None, :] + tl.cumsum(blk, 0) - blk, mask=m)
        starts += tl.sum(blk, 0)  # now start + pairs of e in chunks up to this block
    # starts == each run's start + count: the run's padding follows
    offs_j = tl.arange(0, BM)
    pad = starts[:, None] + offs_j[None, :]
    tl.store(sorted_ptr + pad, P + pad * 0, mask=e_ok[:, None] & (pad < ends[:, None]))
    tl.store(npad_ptr, tl.sum(padded, 0))
    last = E - 1
    for b0 in range(0, n_blocks, BB):
        b = b0 + tl.arange(0, BB)
        ex = tl.sum(((ends[None, :] <= (b * BM)[:, None]) & e_ok[None, :]).to(tl.int32), 1)
        tl.store(block_expert_ptr + b, tl.minimum(ex, last), mask=b < n_blocks)


@triton.jit
def sort_scatter_kernel(ids_ptr, hist_ptr, sorted_ptr, P, E, CH: tl.constexpr):
    """Chunk c's pairs to their slots: hist[c, e] (from :func:`sort_offsets_kernel`) plus the
    pair's rank among the chunk's earlier pairs of the same expert (stable)."""
    c = tl.program_id(0)
    i = tl.arange(0, CH)
    offs = c * CH + i
    ok = offs < P
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
    same = (ids[:, None] == ids[None, :]) & (i[None, :] < i[:, None])
    rank = tl.sum(same.to(tl.int32), 1)
    base = tl.load(hist_ptr + c * E + ids, mask=ok, other=0)
    tl.store(sorted_ptr + base + rank, offs, mask=ok)


@triton.jit
def sort_one_chunk_kernel(ids_ptr, sorted_ptr, block_expert_ptr, npad_ptr, scratch_ptr, P, E,
                          n_blocks, BM: tl.constexpr, CH: tl.constexpr, E_BLOCK: tl.constexpr,
                          BB: tl.constexpr):
    """The three sort launches in one program, for P <= CH pairs (decode on the dot path):
    count, padded runs, padding and npad as :func:`sort_offsets_kernel`; each expert writes its
    own blocks' expert (at most CH / BM), the blocks past npad get E - 1; each pair goes to its
    run's start (gathered through ``scratch`` [E_BLOCK]) plus its rank among the earlier pairs
    of its expert."""
    i = tl.arange(0, CH)
    ok = i < P
    ids = tl.load(ids_ptr + i, mask=ok, other=0).to(tl.int32)
    offs_e = tl.arange(0, E_BLOCK)
    e_ok = offs_e < E
    counts = tl.histogram(ids, E_BLOCK)
    counts -= tl.where(offs_e == 0, CH - tl.sum(ok.to(tl.int32), 0), 0)  # masked slots in bin 0
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    tl.store(scratch_ptr + offs_e, starts)
    pad = (starts + counts)[:, None] + tl.arange(0, BM)[None, :]
    tl.store(sorted_ptr + pad, P + pad * 0, mask=e_ok[:, None] & (pad < ends[:, None]))
    npad = tl.sum(padded, 0)
    tl.store(npad_ptr, npad)
    MB: tl.constexpr = CH // BM
    blk = (starts // BM)[:, None] + tl.arange(0, MB)[None, :]
    tl.store(block_expert_ptr + blk, offs_e[:, None] + blk * 0,
             mask=e_ok[:, None] & (blk * BM < ends[:, None]))
    for b0 in range(0, n_blocks, BB):
        b = b0 + tl.arange(0, BB)
        tl.store(block_expert_ptr + b, E - 1 + b * 0, mask=(b < n_blocks) & (b * BM >= npad))
    tl.debug_barrier()  # scratch: every thread's starts stored before any is gathered
    base = tl.load(scratch_ptr + ids)
    same = (ids[:, None] == ids[None, :]) & (i[None, :] < i[:, None]) & ok[None, :]
    rank = tl.sum(same.to(tl.int32), 1)
    tl.store(sorted_ptr + base + rank, i, mask=ok)


SORT_CHUNK = 128
SORT_ONE_LAUNCH = True  # one chunk: sort_one_chunk_kernel (False: the three launches; tuning)


def sort_pairs_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """:func:`sort_pairs` in three Triton launches (count per chunk, offsets, scatter), or one
    where the pairs fit one chunk; stable and deterministic; entries of ``sorted`` past npad are
    not written (no kernel reads them)."""
    flat = topk_ids.reshape(-1)
    P = flat.numel()
    dev = flat.device
    E = num_experts
    n_chunks = triton.cdiv(P, SORT_CHUNK)
    n_blocks = max_blocks(P, E, block_m)
    sorted_ids = torch.empty((P + E * (block_m - 1),), dtype=torch.int32, device=dev)
    block_expert = torch.empty((n_blocks,), dtype=torch.int32, device=dev)
    npad = torch.empty((1,), dtype=torch.int32, device=dev)
    e_block = max(16, triton.next_power_of_2(E))
    if n_chunks == 1 and SORT_ONE_LAUNCH and SORT_CHUNK % block_m == 0:
        scratch = torch.empty((e_block,), dtype=torch.int32, device=dev)
        sort_one_chunk_kernel[(1,)](flat, sorted_ids, block_expert, npad, scratch, P, E,
                                    n_blocks, BM=block_m, CH=SORT_CHUNK, E_BLOCK=e_block,
                                    BB=256, num_warps=4)
        return sorted_ids, block_expert, npad
    hist = torch.empty((n_chunks, E), dtype=torch.int32, device=dev)
    sort_count_kernel[(n_chunks,)](flat, hist, P, E, CH=SORT_CHUNK, E_BLOCK=e_block)
    sort_offsets_kernel[(1,)](hist, sorted_ids, block_expert, npad, P, E, n_chunks, n_blocks,
                              BM=block_m, E_BLOCK=e_block, R=max(1, 4096 // e_block),
                              BB=max(1, 4096 // e_block), num_warps=4)
    sort_scatter_kernel[(n_chunks,)](flat, hist, sorted_ids, P, E, CH=SORT_CHUNK)
    return sorted_ids, block_expert, npad


def max_blocks(P: int, num_experts: int, block_m: int) -> int:
    """Most blocks :func:`sort_pairs` can fill: each hit expert leaves at most one partial block."""
    return min(triton.cdiv(P + num_experts * (block_m - 1), block_m),
               min(num_experts, P) + P // block_m)


def _block_k(bk: int, group: int, K: int) -> int:
    if group < K:  # a tile never straddles two groups
        return min(bk, group & -group)
    return min(bk, max(16, triton.next_power_of_2(K)))


def _gemv_tile(block_k: int, group: int, K: int) -> tuple[int, int]:
    """(K tile, groups per tile) of the gemv path: tiles of several groups where the group is a
    power of two and every tile is whole (K % tile == 0; K splits start on tile boundaries)."""
    if group < K and block_k > group and group & (group - 1) == 0:
        t = triton.next_power_of_2(block_k)
        if K % t == 0 and t // group <= 16:
            return t, t // group
    return _block_k(block_k, group, K), 1


def gemv_splits(split_k: int, block_k: int, group: int, K: int) -> int:
    """The K splits a gemv down GEMM launches: ``split_k``, at most one per K tile."""
    return min(split_k, triton.cdiv(K, _gemv_tile(block_k, group, K)[0]))


def serial_ok(M: int, N: int, block_n: int) -> bool:
    """Whether the down GEMM can reduce in its own programs (:func:`_down_epilogue`): one
    counter per (token, N tile) in the shared counter buffer."""
    return M * triton.cdiv(N, block_n) <= MAX_TILES


def dot_operand(a_dtype, scales_dtype, zeros_dtype, zero_kind: int, group: int, K: int,
                has_perm: bool, gated: bool, BLOCK_N: int, BLOCK_K: int, num_warps: int,
                FRAG: int, cuda: bool):
    """(FRAG, USE_ASM, BLOCK_K) a dot-path launch of these operands runs with: the fragment-order
    weight operand where it compiles and the dtypes allow, packed (FRAG 2) only on CUDA."""
    bk = _block_k(BLOCK_K, group, K)
    frag = int(FRAG) if bk % 32 == 0 and BLOCK_N % (16 * num_warps) == 0 else 0
    if has_perm or (gated and bk < 128):
        # Triton 3.6 fails to compile the fragment-order operand (FRAG 1/2) with x gathered
        # through perm, and in the gated GEMM with K tiles below 128 (PassManager failure in
        # TritonGPUOptimizeDotOperands, seen on an H200): the portable unpack there.
        frag = 0
    if frag == 2 and (a_dtype not in (torch.bfloat16, torch.float16) or scales_dtype != a_dtype
                      or (zero_kind == 2 and zeros_dtype != a_dtype)):
        frag = 1
    use_asm = frag == 2 and cuda and torch.version.hip is None and not interpreting()
    if frag == 2 and not use_asm and not interpreting():
        frag = 1  # no packed instructions here (XPU, ROCm)
    return frag, use_asm, bk


def x_order(operand, K: int, num_stages: int):
    """The (BLOCK_K, packed) fragment order a dot launch with ``operand`` (:func:`dot_operand`)
    can take its A columns in, pre-permuted (X_FRAG), or None: FRAG 1/2, whole K tiles and at
    most 3 pipeline stages (4 gave NaN on an H100, Mixtral-8x7B at 4096 tokens, Triton 3.6)."""
    frag, _, bk = operand
    return (bk, frag == 2) if frag and K % bk == 0 and num_stages <= 3 else None


@functools.lru_cache(maxsize=64)
def _x_gather_index(K: int, block_k: int, packed: bool, device) -> torch.Tensor:
    """idx with x[:, idx] = x's columns in fragment order (the inverse of frag_positions)."""
    idx = torch.empty(K, dtype=torch.int64)
    idx[frag_positions(K, block_k, packed)] = torch.arange(K)
    return idx.to(device)


def moe_gemm(a, qweight, scales, zeros, perm, zero_kind: int, group: int, out, topk_ids,
             topk_weights, top_k: int, gated: bool, act: int = 0, path: str = "gemv",
             sorting=None, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, SORTED=False,
             FRAG=0, GROUP_M=1, PDL=False, y=None, num_warps=4, num_stages=2, XPERM=False,
             a_order=None, out_order=None, PDL_EARLY=False, PREFETCH=False):
    """One expert GEMM over all pairs. a: x [M, K] (gate_up, A_DIV = top_k) or h [P, K] (down);
    qweight [E, N', K/8] (N' = 2N when gated); out: h [P, N] (gated) or [SPLIT_K, P, N].
    ``sorting``: :func:`sort_pairs` output for the dot path (shared by both GEMMs).
    gemv path, ``y`` [M, N] given (down only, :func:`serial_ok`): the down GEMM also reduces
    into y, and no reduce launch is needed. Returns whether y was written. SPLIT_K splits are
    launched as given (``out`` has that many); :func:`gemv_splits` is the caller's cap.
    Dot path, A's columns in fragment order instead of permuted per K tile in the kernel:
    ``XPERM`` (gate_up) gathers x into this launch's order (:func:`x_order`) first, where it has
    one; ``a_order`` (down) says which order h was written in (the gate_up's ``out_order``),
    used only if it is this launch's own; ``out_order`` (gate_up): write h in that order."""
    n_rows = qweight.shape[1]
    K = a.shape[1]
    N = n_rows // 2 if gated else n_rows
    P = topk_ids.numel()
    split = 1 if gated else SPLIT_K
    if path == "gemv":
        bk, gpt = _gemv_tile(BLOCK_K, group, K)
    else:
        bk, gpt = _block_k(BLOCK_K, group, K), 1
    has_perm = perm.numel() > 0
    pm = perm if has_perm else qweight
    serial = y is not None and not gated
    pdl = use_pdl(PDL, a.device)
    # PDL: down launches while gate_up drains (waiting for it before reading h); gate_up lets it
    common = dict(PDL=pdl, **pdl_launch_option(pdl and not gated),
                  A_DIV=top_k if gated else 1, GATED=gated, ACT=act, ZERO_KIND=zero_kind,
                  HAS_PERM=has_perm, SPLIT_K=split, BLOCK_N=BLOCK_N, BLOCK_K=bk,
                  GROUP_SHIFT=group_shift(group, K), GROUP_M=max(1, int(GROUP_M)),
                  num_warps=num_warps, num_stages=num_stages)
    strides = (a.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0),
               perm.stride(0) if has_perm else 0)
    if path == "gemv":
        ids = topk_ids.reshape(-1)
        cnt = tile_counters(a.device) if serial else ids
        yy = y if serial else out
        grid = (triton.cdiv(N, BLOCK_N) * P, split)
        order = sorting if SORTED else ids
        moe_gemv_kernel[grid](a, qweight, scales, zeros, pm, out, yy, cnt, ids, order,
                              topk_weights, P, N, K, group, *strides, ONE_BITS,
                              PDL_EARLY=pdl and bool(PDL_EARLY),
                              PREFETCH=bool(PREFETCH) and not gated,
                              SORTED=bool(SORTED), SERIAL=serial, TOP_K=top_k,
                              EVEN_K=K % bk == 0, GPT=gpt, **common)
        return serial
    sorted_ids, block_expert, npad = sorting
    operand = dot_operand(a.dtype, scales.dtype, zeros.dtype, zero_kind, group, K, has_perm,
                          gated, BLOCK_N, BLOCK_K, num_warps, FRAG, a.is_cuda)
    frag, use_asm, bk = operand
    order = x_order(operand, K, num_stages)
    if gated:
        x_frag = bool(XPERM) and order is not None
        if x_frag:
            a = a.index_select(1, _x_gather_index(K, order[0], order[1], a.device))
            strides = (a.stride(0),) + strides[1:]
    else:
        x_frag = a_order is not None
        if x_frag and a_order != order:
            raise ValueError(f"h written in fragment order {a_order}, this launch takes {order}")
    out_bk, out_packed = out_order if gated and out_order is not None else (0, False)
    if out_bk and N % out_bk:
        raise ValueError(f"out_order tiles of {out_bk} do not divide N = {N}")
    grid = (triton.cdiv(N, BLOCK_N) * block_expert.numel(), split)
    moe_dot_kernel[grid](a, qweight, scales, zeros, pm, out, sorted_ids, block_expert, npad,
                         topk_weights, P, N, K, group, *strides, ONE_BITS, BLOCK_M=BLOCK_M,
                         FRAG=frag, NUM_WARPS=num_warps, USE_ASM=use_asm,
                         IEEE=a.dtype == torch.float32 or interpreting(), EVEN_K=K % bk == 0,
                         X_FRAG=x_frag, OUT_BK=out_bk, OUT_PACKED=out_packed, **common)
    return False


def moe_reduce(ws, y, top_k: int):
    """y [M, N] = sum over splits and slots of ws [S, M * top_k, N] (summed in fp32)."""
    S, _, N = ws.shape
    M = y.shape[0]
    block = 1024
    moe_reduce_kernel[(triton.cdiv(M * N, block),)](ws, y, M, N, TOP_K=top_k, SPLIT_K=S,
                                                    BLOCK=block)
    return y
