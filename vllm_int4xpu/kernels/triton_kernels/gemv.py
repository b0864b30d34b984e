"""Small-M path: split-K GEMV on CUDA cores / EUs (FMA), one program per (N tile, ROWS rows of x,
K split).

Each K tile is a [BN, BK/8] block of packed words (16-byte loads along K). It is never interleaved
into k order: nibble j of word w is input channel 8w + j, so the kernel works on nibble *planes*
(each a [BN, BK/8] tensor in the words' own layout) against the matching strided slices of x. The
accumulator is 2-D ([BN, BK/32]: each thread's four words of a 16-byte load are summed in-thread
per tile), so the one cross-lane reduction along K happens after the loop. Two planes come from one
shift (``nibble_pair_as_float``); inside a group w = q*s + b, so scale and offset are applied once
per tile on the sums. What is left per weight is about one shift per two weights, one LOP3 and one
FMA (4.1 SASS instructions per weight at M = 1 with 72 registers, ``benchmarks/tuning/sass_count.py``,
against 6.5 for the earlier interleaved unpack), and x is read as int32 pairs of bf16/fp16.

K_FASTEST (default) makes the split index the fastest grid dimension, so the K splits of one N
tile run side by side and the weight's rows are read whole, in DRAM-page order (on H100, M = 1:
149 -> 104 us for 8192x57344). ROWS = 2 or 4 rows of x share each unpacked tile (M = 2..4).
STAGES = 1 double-buffers the next tile in registers by hand; STAGES >= 2 lets the compiler
pipeline the loads (cp.async through shared memory on CUDA). Power-of-two groups index by a shift
(``group_of``), and when K is a multiple of the tile (EVEN_K) and N of BLOCK_N (EVEN_N) no load
carries a mask.
"""

import torch
import triton
from triton import next_power_of_2 as triton_next_pow2
import triton.language as tl

from .common import (ONE_BITS, group_of, group_scale_offset, group_shift, nibble_pair_as_float,
                     pdl_launch_next, pdl_launch_option, pdl_wait, splitk_grid, splitk_reduce,
                     splitk_serial_reduce, tile_counters, tile_ids, use_pdl)


@triton.jit
def _load_tile(w_rows, s_ptr, z_ptr, k0, k_hi, K, N, GROUP, offs_n, n_mask, offs_w,
               ZERO_KIND: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
               GROUP_SHIFT: tl.constexpr):
    """Words [BN, BK/8] and the group's (scale, offset) of the tile at k0."""
    wk = k0 // 8 + offs_w
    if EVEN_K:  # k0 is always a valid tile start here (the caller clamps the prefetch)
        if EVEN_N:
            words = tl.load(w_rows + wk[None, :], eviction_policy="evict_first")
        else:
            words = tl.load(w_rows + wk[None, :], mask=n_mask[:, None], other=0,
                            eviction_policy="evict_first")
    else:
        # (offs * 0 + k0) keeps the "past the end" test uniform along K, so loads still vectorize
        w_ok = (wk < K // 8) & ((offs_w * 0 + k0) < k_hi)
        words = tl.load(w_rows + wk[None, :], mask=n_mask[:, None] & w_ok[None, :], other=0,
                        eviction_policy="evict_first")
    g = group_of(tl.minimum(k0, K - 1), GROUP, GROUP_SHIFT)
    s, b = group_scale_offset(s_ptr, z_ptr, g, offs_n, n_mask | EVEN_N, N, ZERO_KIND)
    return words, s, b


@triton.jit
def _x_pair(x_row, k, k_hi, X_PAIRS: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 (16 * x[k], x[k + 1]) for even k. X_PAIRS 1 (bf16) / 2 (fp16): x_row points at x
    viewed as int32, one load per pair of activations; 0: x is fp32, two loads."""
    if X_PAIRS == 0:
        if EVEN_K:
            lo = tl.load(x_row + k)
            hi = tl.load(x_row + k + 1)
        else:
            lo = tl.load(x_row + k, mask=k < k_hi, other=0.0)
            hi = tl.load(x_row + k + 1, mask=k < k_hi, other=0.0)
    else:
        if EVEN_K:
            pair = tl.load(x_row + k // 2)
        else:
            pair = tl.load(x_row + k // 2, mask=k < k_hi, other=0)
        if X_PAIRS == 1:  # bf16 is the top half of an fp32
            lo = (pair << 16).to(tl.float32, bitcast=True)
            hi = (pair & -65536).to(tl.float32, bitcast=True)
        else:
            lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo * 16.0, hi


@triton.jit
def _row_step(t, xh, xl16, v_hi, v_lo, x_row, k, k_hi, X_PAIRS: tl.constexpr,
              EVEN_K: tl.constexpr):
    """One nibble pair of one row of x: t += v_hi x_hi + v_lo 16 x_lo, and the x sums."""
    x_lo16, x_hi = _x_pair(x_row, k, k_hi, X_PAIRS, EVEN_K)
    t += v_hi * x_hi[None, :]  # two separate += so each is one FMA
    t += v_lo * x_lo16[None, :]
    return t, xh + x_hi, xl16 + x_lo16


@triton.jit
def _row_fold(acc, acc_r, t, xh, xl16, s16, b):
    """Fold one tile's sums of one row into its accumulators (see the kernel's comment)."""
    BN: tl.constexpr = t.shape[0]
    W: tl.constexpr = t.shape[1]
    if W >= 4:
        # sum each run of 4 words first: they sit in one thread (one 16-byte load), so this is
        # in-register and keeps the accumulator at a quarter of the tile (fewer registers)
        acc += tl.sum(tl.reshape(t, [BN, W // 4, 4]), axis=2) * s16[:, None]
    else:
        acc += t * s16[:, None]
    sh = tl.sum(xh, axis=0)  # the x sums are the same for every output: reduce them first,
    sl = tl.sum(xl16, axis=0)  # then one FMA per output row
    acc_r += b * (sh + sl * 0.0625)
    acc_r -= s16 * (sh + sl)
    return acc, acc_r


@triton.jit
def _tile(words, s, b, k0, k_hi, acc0, acc_r0, acc1, acc_r1, acc2, acc_r2, acc3, acc_r3,
          x_row0, x_row1, x_row2, x_row3, offs_w, one_bits, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, X_PAIRS: tl.constexpr, EVEN_K: tl.constexpr,
          ROWS: tl.constexpr):
    """One K tile of words [BLOCK_N, BLOCK_K/8] against ROWS rows of x (accumulators of rows
    past ROWS pass through untouched)."""
    # Nibble j of word w is input channel k0 + 8w + j: one strided x slice per nibble, in the
    # words' own layout (no interleave, no per-tile reduction). Nibbles (2p+1, 2p) come from
    # one shift as hi = 1 + q/16 and lo = 1 + q/256 (nibble_pair_as_float); with lo
    # multiplied by x' = 16 x, every term is (16 + q)/16 times its x (or x'), so
    #   sum_k w_k x_k = 16 s * t + b * (H + L'/16) - 16 s * (H + L'),
    #   t = sum v x (x' for even nibbles),  H = sum of odd-nibble x,  L' = sum of even x'.
    t0 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    xh0 = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
    xl0 = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
    if ROWS >= 2:
        t1, xh1, xl1 = t0, xh0, xl0
    if ROWS >= 4:
        t2, xh2, xl2 = t0, xh0, xl0
        t3, xh3, xl3 = t0, xh0, xl0
    for p in tl.static_range(4):
        v_hi, v_lo = nibble_pair_as_float(words, p, one_bits)
        k = k0 + offs_w * 8 + 2 * p
        t0, xh0, xl0 = _row_step(t0, xh0, xl0, v_hi, v_lo, x_row0, k, k_hi, X_PAIRS, EVEN_K)
        if ROWS >= 2:
            t1, xh1, xl1 = _row_step(t1, xh1, xl1, v_hi, v_lo, x_row1, k, k_hi, X_PAIRS,
                                     EVEN_K)
        if ROWS >= 4:
            t2, xh2, xl2 = _row_step(t2, xh2, xl2, v_hi, v_lo, x_row2, k, k_hi, X_PAIRS,
                                     EVEN_K)
            t3, xh3, xl3 = _row_step(t3, xh3, xl3, v_hi, v_lo, x_row3, k, k_hi, X_PAIRS,
                                     EVEN_K)
    s16 = 16.0 * s
    acc0, acc_r0 = _row_fold(acc0, acc_r0, t0, xh0, xl0, s16, b)
    if ROWS >= 2:
        acc1, acc_r1 = _row_fold(acc1, acc_r1, t1, xh1, xl1, s16, b)
    if ROWS >= 4:
        acc2, acc_r2 = _row_fold(acc2, acc_r2, t2, xh2, xl2, s16, b)
        acc3, acc_r3 = _row_fold(acc3, acc_r3, t3, xh3, xl3, s16, b)
    return acc0, acc_r0, acc1, acc_r1, acc2, acc_r2, acc3, acc_r3


@triton.jit
def int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, GROUP,
                     stride_xm, stride_ym, stride_qn, one_bits,
                     ZERO_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     EVEN_N: tl.constexpr, GROUP_SHIFT: tl.constexpr, SERIAL: tl.constexpr,
                     X_PAIRS: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
                     K_FASTEST: tl.constexpr, PDL: tl.constexpr = False):
    pid_n, pid_m, pid_k, n_tiles = tile_ids(K_FASTEST)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // 8)
    # K range of this split, in whole tiles.
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    # EVEN_K: every prefetch start is clamped into [0, last tile of this split] (an empty
    # trailing split re-reads tile 0 and never uses it), so no load needs a mask along K.
    k_last = tl.maximum(k_hi - BLOCK_K, 0)
    # ROWS rows of x per program share each unpacked weight tile. Rows past M re-read row M - 1
    # (no masks in the loop) and are not stored.
    m0 = pid_m * ROWS
    x_row0 = x_ptr + tl.minimum(m0, M - 1).to(tl.int64) * stride_xm
    x_row1 = x_ptr + tl.minimum(m0 + 1, M - 1).to(tl.int64) * stride_xm
    x_row2 = x_ptr + tl.minimum(m0 + 2, M - 1).to(tl.int64) * stride_xm
    x_row3 = x_ptr + tl.minimum(m0 + 3, M - 1).to(tl.int64) * stride_xm
    # Per row, a 2-D accumulator [BLOCK_N, BLOCK_K/32] (column c sums the code terms of the
    # thread-local run of 4 words c over tiles, see _row_fold: the one cross-lane reduction
    # along K happens after the loop) and a [BLOCK_N] one for the terms without codes.
    ACC_W: tl.constexpr = BLOCK_K // 32 if BLOCK_K >= 32 else BLOCK_K // 8
    acc0 = tl.zeros([BLOCK_N, ACC_W], dtype=tl.float32)
    acc_r0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1, acc_r1, acc2, acc_r2, acc3, acc_r3 = acc0, acc_r0, acc0, acc_r0, acc0, acc_r0
    w_rows = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    if STAGES >= 2:
        # The compiler's software pipeline: STAGES - 1 tiles in flight through shared memory
        # (cp.async on CUDA), without holding them in registers.
        pdl_wait(PDL)  # the pipeline's first loads include x
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            if EVEN_K:
                k0 = tl.multiple_of(k0, BLOCK_K)
            words, s, b = _load_tile(w_rows, s_ptr, z_ptr, k0, k_hi, K, N, GROUP, offs_n,
                                     n_mask, offs_w, ZERO_KIND, EVEN_K, EVEN_N, GROUP_SHIFT)
            acc0, acc_r0, acc1, acc_r1, acc2, acc_r2, acc3, acc_r3 = _tile(
                words, s, b, k0, k_hi, acc0, acc_r0, acc1, acc_r1, acc2, acc_r2, acc3, acc_r3,
                x_row0, x_row1, x_row2, x_row3, offs_w, one_bits, BLOCK_N, BLOCK_K, X_PAIRS,
                EVEN_K, ROWS)
    else:
        # Hand-rolled double buffering in registers: the loads of tile i+1 are issued before
        # tile i is computed (for targets whose compiler does not pipeline plain loads).
        k_first = tl.multiple_of(tl.minimum(k_lo, k_last), BLOCK_K) if EVEN_K else k_lo
        words, s, b = _load_tile(w_rows, s_ptr, z_ptr, k_first, k_hi, K, N, GROUP, offs_n,
                                 n_mask, offs_w, ZERO_KIND, EVEN_K, EVEN_N, GROUP_SHIFT)
        pdl_wait(PDL)  # the first weight tile is in flight; x is read from here on
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:  # tile starts are multiples of BLOCK_K: tell the compiler (16-B loads)
                k_next = tl.multiple_of(tl.minimum(k0 + BLOCK_K, k_last), BLOCK_K)
            else:
                k_next = k0 + BLOCK_K
            nwords, ns, nb = _load_tile(w_rows, s_ptr, z_ptr, k_next, k_hi, K, N, GROUP, offs_n,
                                        n_mask, offs_w, ZERO_KIND, EVEN_K, EVEN_N, GROUP_SHIFT)
            acc0, acc_r0, acc1, acc_r1, acc2, acc_r2, acc3, acc_r3 = _tile(
                words, s, b, k0, k_hi, acc0, acc_r0, acc1, acc_r1, acc2, acc_r2, acc3, acc_r3,
                x_row0, x_row1, x_row2, x_row3, offs_w, one_bits, BLOCK_N, BLOCK_K, X_PAIRS,
                EVEN_K, ROWS)
            words, s, b = nwords, ns, nb
    pdl_launch_next(PDL)  # the next kernel may launch into the slots our tail frees
    # [BLOCK_N, ROWS] result: column r is row m0 + r
    y0 = tl.sum(acc0, axis=1) + acc_r0
    if ROWS == 1:
        res = y0[:, None]
    elif ROWS == 2:
        res = tl.join(y0, tl.sum(acc1, axis=1) + acc_r1)
    else:
        lo2 = tl.join(y0, tl.sum(acc1, axis=1) + acc_r1)
        hi2 = tl.join(tl.sum(acc2, axis=1) + acc_r2, tl.sum(acc3, axis=1) + acc_r3)
        res = tl.reshape(tl.permute(tl.join(lo2, hi2), (0, 2, 1)), (BLOCK_N, 4))
    offs_m = m0 + tl.arange(0, ROWS)
    mask = n_mask[:, None] & (offs_m < M)[None, :]
    ws_offs = offs_m[None, :] * N + offs_n[:, None]  # workspace [SPLIT_K, M, N]
    if SPLIT_K > 1 and SERIAL:  # the last split to finish reduces (see splitk_serial_reduce)
        res, count = splitk_serial_reduce(res, ws_ptr + ws_offs, M * N, mask,
                                          cnt_ptr + pid_m * n_tiles + pid_n, pid_k,
                                          SPLIT_K)
    if SPLIT_K == 1 or SERIAL:
        if HAS_BIAS:
            res += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y_offs = offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        done = mask if SPLIT_K == 1 else mask & ((ws_offs * 0 + count) == SPLIT_K - 1)
        tl.store(y_ptr + y_offs, res.to(y_ptr.dtype.element_ty), mask=done)
    else:  # partials to the fp32 workspace [SPLIT_K, M, N]; splitk_reduce sums them
        tl.store(ws_ptr + pid_k * M * N + ws_offs, res, mask=mask)


def int4_gemv(x, qweight, scales, zeros, zero_kind: int, group: int, bias, out,
              BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, SERIAL=True, ROWS=1, STAGES=1,
              K_FASTEST=True, PDL=False, num_warps=4, num_stages=2, **extra):
    """out [M, N] = x [M, K] @ W^T (+ bias). ``out`` is preallocated by the caller.

    PDL: launch as a programmatic dependent launch where supported (CUDA sm_90+; see
    ``common.use_pdl``): the programs start while the previous kernel drains; with STAGES 1
    they load their first weight tile before waiting."""
    M, K = x.shape
    N = qweight.shape[0]
    ROWS = min(ROWS, triton_next_pow2(M))  # 1, 2 or 4 rows of x per program
    assert ROWS in (1, 2, 4), ROWS
    grid, serial, K_FASTEST = splitk_grid(triton.cdiv(N, BLOCK_N), triton.cdiv(M, ROWS),
                                          SPLIT_K, SERIAL, K_FASTEST)
    ws = out if SPLIT_K == 1 else torch.empty((SPLIT_K, M, N), device=x.device,
                                              dtype=torch.float32)
    cnt = tile_counters(x.device) if serial else ws
    pdl = use_pdl(PDL, x.device)
    # bf16 / fp16 activations are read as int32 pairs (one load per two channels)
    x_pairs = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0)
    if x_pairs:
        if x.stride(-1) != 1 or x.stride(0) % 2 or x.storage_offset() % 2:  # not pair-aligned
            x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
        x = x.view(torch.int32)
    int4_gemv_kernel[grid](x, qweight, scales, zeros, bias if bias is not None else scales, out,
                           ws, cnt, M, N, K, group, x.stride(0), out.stride(0), qweight.stride(0),
                           ONE_BITS, ZERO_KIND=zero_kind, HAS_BIAS=bias is not None,
                           SPLIT_K=SPLIT_K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                           EVEN_K=K % BLOCK_K == 0, EVEN_N=N % BLOCK_N == 0,
                           GROUP_SHIFT=group_shift(group, K), SERIAL=serial,
                           X_PAIRS=x_pairs, ROWS=ROWS, STAGES=STAGES,
                           K_FASTEST=K_FASTEST, PDL=pdl,
                           num_warps=num_warps, num_stages=num_stages, **pdl_launch_option(pdl),
                           **extra)
    if SPLIT_K > 1 and not serial:
        splitk_reduce(ws, bias, out)
    return out
