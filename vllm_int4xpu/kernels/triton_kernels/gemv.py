"""Small-M path: split-K GEMV on CUDA cores / EUs (FMA), one program per (N tile, row, K split).

Each K tile is a [BN, BK/8] block of packed words (16-byte loads along K), unpacked in
registers to [BN, BK] codes. Inside one group w = q*s + b, so the group's scale and offset are
applied once per tile on the reduced sums:
    sum_k w_k x_k = s * sum_k q_k x_k + b * sum_k x_k
which leaves unpack (a shift and one LOP3: see ``nibble_as_float``) + one FMA per weight in the
loop. The loop is kept lean because a GEMV on this layout is instruction-bound, not DRAM-bound
(ncu on H100: ~75% issue-slot use at 44% DRAM throughput before these changes): power-of-two
groups index by a shift (``group_of``), and when K is a multiple of the tile (EVEN_K) and N of
BLOCK_N (EVEN_N) no load carries a mask — the prefetch past a split's last tile is clamped to
re-read that tile instead.
"""

import torch
import triton
import triton.language as tl

from .common import (MAX_TILES, ONE_BITS, group_of, group_scale_offset, group_shift,
                     splitk_reduce, splitk_serial_reduce, tile_counters, unpack_along_k)


@triton.jit
def _load_tile(x_row, w_rows, s_ptr, z_ptr, k0, k_hi, K, N, GROUP, offs_n, n_mask, offs_w, offs_k,
               ZERO_KIND: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
               GROUP_SHIFT: tl.constexpr):
    """Words [BN, BK/8], x [BK] (fp32) and the group's (scale, offset) of the tile at k0."""
    wk = k0 // 8 + offs_w
    xk = k0 + offs_k
    if EVEN_K:  # k0 is always a valid tile start here (the caller clamps the prefetch)
        if EVEN_N:
            words = tl.load(w_rows + wk[None, :], eviction_policy="evict_first")
        else:
            words = tl.load(w_rows + wk[None, :], mask=n_mask[:, None], other=0,
                            eviction_policy="evict_first")
        xv = tl.load(x_row + xk).to(tl.float32)
    else:
        # (offs * 0 + k0) keeps the "past the end" test uniform along K, so loads still vectorize
        w_ok = (wk < K // 8) & ((offs_w * 0 + k0) < k_hi)
        words = tl.load(w_rows + wk[None, :], mask=n_mask[:, None] & w_ok[None, :], other=0,
                        eviction_policy="evict_first")
        xv = tl.load(x_row + xk, mask=(xk < K) & ((offs_k * 0 + k0) < k_hi),
                     other=0.0).to(tl.float32)
    g = group_of(tl.minimum(k0, K - 1), GROUP, GROUP_SHIFT)
    s, b = group_scale_offset(s_ptr, z_ptr, g, offs_n, n_mask | EVEN_N, N, ZERO_KIND)
    return words, xv, s, b


@triton.jit
def int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, GROUP,
                     stride_xm, stride_ym, stride_qn, one_bits,
                     ZERO_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     EVEN_N: tl.constexpr, GROUP_SHIFT: tl.constexpr, SERIAL: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    # K range of this split, in whole tiles.
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    # EVEN_K: every prefetch start is clamped into [0, last tile of this split] (an empty
    # trailing split re-reads tile 0 and never uses it), so no load needs a mask along K.
    k_last = tl.maximum(k_hi - BLOCK_K, 0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w_rows = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    # Hand-rolled double buffering: the loads of tile i+1 are issued before tile i is computed
    # (plain loads outside tl.dot are not pipelined by the compiler).
    k_first = tl.minimum(k_lo, k_last) if EVEN_K else k_lo
    words, xv, s, b = _load_tile(x_row, w_rows, s_ptr, z_ptr, k_first, k_hi, K,
                                 N, GROUP, offs_n, n_mask, offs_w, offs_k, ZERO_KIND, EVEN_K,
                                 EVEN_N, GROUP_SHIFT)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_next = tl.minimum(k0 + BLOCK_K, k_last) if EVEN_K else k0 + BLOCK_K
        nwords, nxv, ns, nb = _load_tile(x_row, w_rows, s_ptr, z_ptr, k_next, k_hi, K, N, GROUP,
                                         offs_n, n_mask, offs_w, offs_k, ZERO_KIND, EVEN_K,
                                         EVEN_N, GROUP_SHIFT)
        # v = 1 + q/16:  sum_k w_k x_k = 16 s * sum_k v_k x_k + (b - 16 s) * sum_k x_k
        vx = tl.sum(unpack_along_k(words, one_bits) * xv[None, :], axis=1)
        acc += (16.0 * s) * vx + (b - 16.0 * s) * tl.sum(xv, axis=0)
        words, xv, s, b = nwords, nxv, ns, nb
    if SPLIT_K > 1 and SERIAL:  # the last split to finish reduces (see splitk_serial_reduce)
        acc, count = splitk_serial_reduce(acc, ws_ptr + m * N + offs_n, M * N, n_mask,
                                            cnt_ptr + m * tl.num_programs(0) + pid_n, pid_k,
                                            SPLIT_K)
    if SPLIT_K == 1 or SERIAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        done = n_mask if SPLIT_K == 1 else n_mask & ((offs_n * 0 + count) == SPLIT_K - 1)
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=done)
    else:  # partials to the fp32 workspace [SPLIT_K, M, N]; splitk_reduce sums them
        tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, acc, mask=n_mask)


def int4_gemv(x, qweight, scales, zeros, zero_kind: int, group: int, bias, out,
              BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, SERIAL=True, num_warps=4, num_stages=2,
              **extra):
    """out [M, N] = x [M, K] @ W^T (+ bias). ``out`` is preallocated by the caller."""
    M, K = x.shape
    N = qweight.shape[0]
    grid = (triton.cdiv(N, BLOCK_N), M, SPLIT_K)
    serial = bool(SERIAL) and SPLIT_K > 1 and grid[0] * M <= MAX_TILES
    ws = out if SPLIT_K == 1 else torch.empty((SPLIT_K, M, N), device=x.device,
                                              dtype=torch.float32)
    cnt = tile_counters(x.device) if serial else ws
    int4_gemv_kernel[grid](x, qweight, scales, zeros, bias if bias is not None else scales, out,
                           ws, cnt, M, N, K, group, x.stride(0), out.stride(0), qweight.stride(0),
                           ONE_BITS, ZERO_KIND=zero_kind, HAS_BIAS=bias is not None,
                           SPLIT_K=SPLIT_K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                           EVEN_K=K % BLOCK_K == 0, EVEN_N=N % BLOCK_N == 0,
                           GROUP_SHIFT=group_shift(group, K), SERIAL=serial, num_warps=num_warps,
                           num_stages=num_stages, **extra)
    if SPLIT_K > 1 and not serial:
        splitk_reduce(ws, bias, out)
    return out
