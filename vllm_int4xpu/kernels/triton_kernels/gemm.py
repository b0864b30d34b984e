"""Tensor-core path: tiled tl.dot GEMM with the weight dequantized in registers, optional split-K.

Computed transposed, y^T[BN, BM] = W[BN, BK] @ x^T[BK, BM]: the dequantized weight is the
*left* operand, which tensor cores (wgmma on Hopper, DPAS on Intel) can read from registers, and
small M only pads the narrow side of the MMA. How the weight tile gets into the operand layout:

* FRAG 0: unpacked in k order by interleaves, then converted to the operand layout by the compiler
  (on sm_90 a register -> shared -> ldmatrix round trip); any tile, any device.
* FRAG 1: both operands take one permuted k order (a dot product may sum in any order), chosen so
  that each thread's own 16-byte weight load holds the nibbles its MMA fragment needs; the
  conversion is then a register renaming (sm_90 TTGIR: no shared-memory copy of the weight).
* FRAG 2: as FRAG 1, with nibbles j and j + 4 of a word dequantized as one packed bf16x2/f16x2
  (inline PTX on CUDA; the same arithmetic in fp32 under the interpreter; FRAG 1 elsewhere).

The group scale/offset are loaded once per K tile (a tile never straddles groups), one tile
ahead. Split-K partials are reduced by the last split to finish (``splitk_serial_reduce``) or,
with SERIAL=False, by a second small kernel. PERSIST = P launches P programs per multiprocessor
that walk all (split, N, M) tiles instead of one program per tile (H100, M = 32..256 with
BLOCK_M >= 32: up to 16 % faster, benchmarks/results/sweep_persist_post_scale_h100.txt).
"""

import torch
import triton
import triton.language as tl

from .common import (ONE_BITS, codes_to_float, group_of, group_scale_offset, group_shift,
                     interpreting, multiprocessors, nibble_pair_as_float, pdl_launch_next,
                     pdl_launch_option, pdl_wait, splitk_grid, splitk_reduce,
                     splitk_serial_reduce, tile_counters, tile_ids, unpack_along_k, use_pdl)


@triton.jit
def _frag_rows(BLOCK_N: tl.constexpr, W: tl.constexpr):
    """Row of the N tile held at load-layout row r: a [BN, BK/8] int32 load spreads rows as
    8 lanes x W warps x reps; the A fragment wants 16-row blocks per warp with rows g and g + 8
    in one thread, so load row r = 8 W (2 a + b) + 8 wp + g holds tile row 16 W a + 16 wp + 8 b + g."""
    r = tl.arange(0, BLOCK_N)
    g = r % 8
    wp = (r // 8) % W
    rep = r // (8 * W)
    return g + 8 * (rep % 2) + 16 * wp + 16 * W * (rep // 2)


@triton.jit
def _frag_rows_back(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W: tl.constexpr):
    """Rows of w from load order (_frag_rows) back to tile order."""
    w5 = tl.reshape(w, [BLOCK_N // (16 * W), 2, W, 8, BLOCK_K])
    w5 = tl.permute(w5, [0, 2, 1, 3, 4])
    return tl.reshape(w5, [BLOCK_N, BLOCK_K])


@triton.jit
def _frag_order(x, R: tl.constexpr, BLOCK_K: tl.constexpr, PACKED: tl.constexpr):
    """[R, BLOCK_K] in k order -> the kernel's fragment order k' = 32 i + 16 h + 8 e1 + 2 t + e0
    (see _frag_dequant; PACKED: the pair order of _frag_dequant_packed)."""
    I: tl.constexpr = BLOCK_K // 32
    x6 = tl.reshape(x, [R, 4, I, 2, 2, 2])
    if PACKED:  # k = 8I t + 8 i + 4 e0 + 2 h + e1
        x6 = tl.permute(x6, [0, 2, 4, 5, 1, 3])
    else:  # k = 8I t + 8 i + 4 h + 2 e1 + e0
        x6 = tl.permute(x6, [0, 2, 3, 4, 1, 5])
    return tl.reshape(x6, [R, BLOCK_K])  # [R, i, h, e1, t, e0]


@triton.jit
def _frag_position(k, BLOCK_K: tl.constexpr, PACKED: tl.constexpr):
    """Column of :func:`_frag_order`'s output that holds column k (0 <= k < BLOCK_K) of its input
    tile: with k = 8I t + 8 i + 4 a + 2 b + c, 32 i + 16 b + 8 c + 2 t + a (PACKED) or
    32 i + 16 a + 8 b + 2 t + c. A producer that stores k at this column hands the next GEMM its
    x tile already in fragment order (its ``X_FRAG``); :func:`frag_positions` is the host twin."""
    I: tl.constexpr = BLOCK_K // 32
    t = k // (8 * I)
    i = (k // 8) % I
    a = (k // 4) % 2
    b = (k // 2) % 2
    c = k % 2
    if PACKED:
        return 32 * i + 16 * b + 8 * c + 2 * t + a
    else:
        return 32 * i + 16 * a + 8 * b + 2 * t + c


def frag_positions(K: int, block_k: int, packed: bool) -> torch.Tensor:
    """Host twin of :func:`_frag_position` over K channels in tiles of ``block_k`` (K a multiple
    of it): pos[k] = the column that holds channel k once every tile is in fragment order."""
    k = torch.arange(K, dtype=torch.int64)
    base, r = k - k % block_k, k % block_k
    n_i = block_k // 32
    t, i, a, b, c = r // (8 * n_i), (r // 8) % n_i, (r // 4) % 2, (r // 2) % 2, r % 2
    if packed:
        return base + 32 * i + 16 * b + 8 * c + 2 * t + a
    return base + 32 * i + 16 * a + 8 * b + 2 * t + c


@triton.jit
def _pairs_to_fragment_order(p0, p1, p2, p3, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Four [BN, t, i, e0] pair tensors (p = 2 h + e1) -> [BN, BK] in fragment order
    k' = 32 i + 16 h + 8 e1 + 2 t + e0 (joins keep every element in the thread that loaded it)."""
    q = tl.join(tl.join(p0, p1), tl.join(p2, p3))  # [BN, t, i, e0, e1, h]
    q = tl.permute(q, [0, 2, 5, 4, 1, 3])  # [BN, i, h, e1, t, e0]
    return tl.reshape(q, [BLOCK_N, BLOCK_K])


@triton.jit
def _frag_dequant(words, s, b, one_bits, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """words [BN, BK/8] (k order) -> fp32 [BN, BK] in fragment order k' = 32 i + 16 h + 8 e1 +
    2 t + e0 for the channel k = 8I t + 8 i + 4 h + 2 e1 + e0: thread t of an MMA quad owns
    words I t .. I t + I - 1 whole, and each k16 slice of k' is what the A fragment wants."""
    I: tl.constexpr = BLOCK_K // 32
    w3 = tl.reshape(words, [BLOCK_N, 4, I])
    s3 = s[:, None, None]
    b3 = b[:, None, None]
    hi0, lo0 = nibble_pair_as_float(w3, 0, one_bits)
    hi1, lo1 = nibble_pair_as_float(w3, 1, one_bits)
    hi2, lo2 = nibble_pair_as_float(w3, 2, one_bits)
    hi3, lo3 = nibble_pair_as_float(w3, 3, one_bits)
    s16 = 16.0 * s3
    s256 = 256.0 * s3
    b16 = b3 - s16
    b256 = b3 - s256
    p0 = tl.join(lo0 * s256 + b256, hi0 * s16 + b16)  # [BN, t, i, e0]
    p1 = tl.join(lo1 * s256 + b256, hi1 * s16 + b16)
    p2 = tl.join(lo2 * s256 + b256, hi2 * s16 + b16)
    p3 = tl.join(lo3 * s256 + b256, hi3 * s16 + b16)
    return _pairs_to_fragment_order(p0, p1, p2, p3, BLOCK_N, BLOCK_K)


@triton.jit
def _group_affine(s_ptr, z_ptr, g, offs_n, n_mask, N, ZERO_KIND: tl.constexpr,
                  PACKED: tl.constexpr, MAGIC: tl.constexpr):
    """Per-row constants of group g. Unpacked: (s, b, -) with w = q*s + b (fp32). PACKED:
    (s, z, c) with w = (v - c)*s + z for v = MAGIC + q, all exact in the activation dtype
    (c = MAGIC + zero point, an integer; z = 0 or the float zero), so the packed path rounds once."""
    if PACKED:
        sc = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ZERO_KIND == 1:
            c = MAGIC + tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
            z = tl.zeros_like(sc)
        elif ZERO_KIND == 2:
            c = tl.full(sc.shape, MAGIC + 8.0, tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        else:
            c = tl.full(sc.shape, MAGIC + 8.0, tl.float32)
            z = tl.zeros_like(sc)
        return sc, z, c
    else:
        sc, b = group_scale_offset(s_ptr, z_ptr, g, offs_n, n_mask, N, ZERO_KIND)
        return sc, b, sc


# $1/$2: the int32 (twice: pack = 2 hands each instance two elements), $3: c, $4: s, $5: z as
# packed pairs; lop3 0xea = (a & b) | c puts both nibbles into the mantissa of MAGIC.
_PAIR_ASM_BF16 = tl.constexpr("{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xea; "
                              "sub.rn.bf16x2 t, t, $3; fma.rn.bf16x2 $0, t, $4, $5; }")
_PAIR_ASM_F16 = tl.constexpr("{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xea; "
                             "sub.rn.f16x2 t, t, $3; fma.rn.f16x2 $0, t, $4, $5; }")


@triton.jit
def _packed_pair(sh, s, z, c, MAGIC: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """Nibbles at bits 0..3 and 16..19 of each int32 -> [.., 2] in dtype DT: (v - c)*s + z with
    v = MAGIC + q. With USE_ASM (CUDA) one lop3 builds both v as a bf16x2/f16x2 (the code OR-ed
    into the mantissa of MAGIC = 128 / 1024), then a packed sub and fma: 1.5 instructions per
    weight against 3 for the fp32 route. Without it the same arithmetic in fp32 (interpreter, XPU)."""
    if USE_ASM:
        s2 = tl.join(s, s).to(DT)
        z2 = tl.join(z, z).to(DT)
        c2 = tl.join(c, c).to(DT)
        sh2 = tl.join(sh, sh)
        if DT == tl.bfloat16:
            return tl.inline_asm_elementwise(_PAIR_ASM_BF16, "=r,r,r,r,r,r", [sh2, c2, s2, z2],
                                             dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(_PAIR_ASM_F16, "=r,r,r,r,r,r", [sh2, c2, s2, z2],
                                             dtype=tl.float16, is_pure=True, pack=2)
    else:
        lo = codes_to_float(sh & 0xF) + MAGIC
        hi = codes_to_float((sh >> 16) & 0xF) + MAGIC
        return tl.join((lo - c) * s + z, (hi - c) * s + z).to(DT)


@triton.jit
def _frag_dequant_packed(words, s, z, c, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         MAGIC: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """As _frag_dequant, but nibbles j and j + 4 of a word form the packed pair (e0 = j // 4,
    2 h + e1 = j % 4: channel k = 8I t + 8 i + 4 e0 + 2 h + e1), so one shift serves two
    weights and the pair lands in one register, already in the MMA operand dtype."""
    I: tl.constexpr = BLOCK_K // 32
    w3 = tl.reshape(words, [BLOCK_N, 4, I])
    s3 = tl.broadcast_to(s[:, None, None], [BLOCK_N, 4, I])
    z3 = tl.broadcast_to(z[:, None, None], [BLOCK_N, 4, I])
    c3 = tl.broadcast_to(c[:, None, None], [BLOCK_N, 4, I])
    p0 = _packed_pair(w3, s3, z3, c3, MAGIC, DT, USE_ASM)  # [BN, t, i, e0]
    p1 = _packed_pair(w3 >> 4, s3, z3, c3, MAGIC, DT, USE_ASM)
    p2 = _packed_pair(w3 >> 8, s3, z3, c3, MAGIC, DT, USE_ASM)
    p3 = _packed_pair(w3 >> 12, s3, z3, c3, MAGIC, DT, USE_ASM)
    return _pairs_to_fragment_order(p0, p1, p2, p3, BLOCK_N, BLOCK_K)


@triton.jit
def _dot(acc, w, xt, IEEE: tl.constexpr):
    if IEEE:  # fp32 activations; also the interpreter, whose bf16 dot is wrong
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, xt, acc)


@triton.jit
def _tile_dot(acc, words, x, s, b, c, one_bits, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_M: tl.constexpr, FRAG: tl.constexpr, NUM_WARPS: tl.constexpr,
              USE_ASM: tl.constexpr, IEEE: tl.constexpr, MAGIC: tl.constexpr,
              X_FRAG: tl.constexpr):
    """acc += dequant(words)[BN, BK] @ x[BM, BK]^T for one K tile (words in load order; with
    X_FRAG, x's columns already in fragment order, so x goes to the MMA as loaded)."""
    PACKED: tl.constexpr = FRAG == 2
    if FRAG:  # both operands in the MMA-fragment k order (module docstring)
        if X_FRAG:
            xt = tl.trans(x)
        else:
            xt = tl.trans(_frag_order(x, BLOCK_M, BLOCK_K, PACKED))
        if PACKED:
            w = _frag_dequant_packed(words, s, b, c, BLOCK_N, BLOCK_K, MAGIC, xt.dtype, USE_ASM)
        else:
            w = _frag_dequant(words, s, b, one_bits, BLOCK_N, BLOCK_K).to(xt.dtype)
        w = _frag_rows_back(w, BLOCK_N, BLOCK_K, NUM_WARPS)
    else:  # nibbles peeled in registers into k order
        xt = tl.trans(x)
        v = unpack_along_k(words, one_bits)  # 1 + q/16, so w = v * 16 s + (b - 16 s)
        w = (v * (16.0 * s)[:, None] + (b - 16.0 * s)[:, None]).to(xt.dtype)
    return _dot(acc, w, xt, IEEE)


@triton.jit
def _gemm_tile(pid_n, pid_m, pid_k, n_tiles, x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr,
               cnt_ptr, M, N, K, GROUP, stride_xm, stride_ym, stride_qn, one_bits,
               ZERO_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GATHER: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
               SERIAL: tl.constexpr, GROUP_SHIFT: tl.constexpr, FRAG: tl.constexpr,
               NUM_WARPS: tl.constexpr, USE_ASM: tl.constexpr, UNROLL: tl.constexpr,
               PDL: tl.constexpr, PDL_TRIGGER: tl.constexpr):
    """Output tile (pid_n, pid_m), K split pid_k: the K loop and the epilogue."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(tiles, SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    if FRAG:  # rows in the order the words' load layout holds them (see _frag_rows)
        offs_nl = pid_n * BLOCK_N + _frag_rows(BLOCK_N, NUM_WARPS)
    else:
        offs_nl = offs_n
    nl_mask = offs_nl < N
    qw_rows = qw_ptr + offs_nl[:, None].to(tl.int64) * stride_qn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    PACKED: tl.constexpr = FRAG == 2
    MAGIC: tl.constexpr = 1024.0 if x_ptr.dtype.element_ty == tl.float16 else 128.0
    s, b, c = _group_affine(s_ptr, z_ptr, group_of(tl.minimum(k_lo, K - 1), GROUP, GROUP_SHIFT),
                            offs_nl, nl_mask, N, ZERO_KIND, PACKED, MAGIC)
    pdl_wait(PDL)  # x is first read by the loop's pipeline prologue
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, loop_unroll_factor=UNROLL):
        xk = k0 + offs_k
        k_ok = (xk < K) | EVEN_K  # EVEN_K: no K mask, so loads vectorize
        # next tile's group scale/offset issued first (small loads the compiler does not
        # pipeline; issuing them before the x tile measured 20-30 % faster at M <= 16 on H100)
        ns, nb, nc = _group_affine(s_ptr, z_ptr,
                                   group_of(tl.minimum(k0 + BLOCK_K, K - 1), GROUP, GROUP_SHIFT),
                                   offs_nl, nl_mask, N, ZERO_KIND, PACKED, MAGIC)
        x = tl.load(x_rows + xk[None, :], mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        if GATHER and not FRAG:  # each k loads its own word: 8x redundant L1 hits
            words = tl.load(qw_rows + (xk // 8)[None, :],
                            mask=n_mask[:, None] & k_ok[None, :], other=0)
            q = codes_to_float((words >> ((xk % 8) * 4)[None, :]) & 0xF)
            w = (q * s[:, None] + b[:, None]).to(x.dtype)
            acc = _dot(acc, w, tl.trans(x), IEEE)
        else:  # one 16-byte load per 4 words (rows in load order with FRAG, _frag_rows)
            wk = k0 // 8 + offs_w
            w_ok = (wk < K // 8) | EVEN_K
            words = tl.load(qw_rows + wk[None, :], mask=nl_mask[:, None] & w_ok[None, :],
                            other=0)
            acc = _tile_dot(acc, words, x, s, b, c, one_bits, BLOCK_N, BLOCK_K, BLOCK_M,
                            FRAG, NUM_WARPS, USE_ASM, IEEE, MAGIC, False)
        s, b, c = ns, nb, nc
    pdl_launch_next(PDL_TRIGGER)  # the next kernel may launch into the slots our tail frees
    y_offs = offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    mask = n_mask[:, None] & m_mask[None, :]
    ws_offs = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]  # workspace [SPLIT_K, M, N]
    if SPLIT_K > 1 and SERIAL:  # the last split to finish reduces (see splitk_serial_reduce)
        acc, count = splitk_serial_reduce(acc, ws_ptr + ws_offs, M * N, mask,
                                            cnt_ptr + pid_m * n_tiles + pid_n, pid_k,
                                            SPLIT_K)
    if SPLIT_K == 1 or SERIAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        done = mask if SPLIT_K == 1 else mask & ((y_offs * 0 + count) == SPLIT_K - 1)
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=done)
    else:
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + ws_offs, acc, mask=mask)


@triton.jit
def int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, GROUP,
                     stride_xm, stride_ym, stride_qn, one_bits,
                     ZERO_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GATHER: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                     SERIAL: tl.constexpr, GROUP_SHIFT: tl.constexpr,
                     K_FASTEST: tl.constexpr, FRAG: tl.constexpr = 0,
                     NUM_WARPS: tl.constexpr = 4, USE_ASM: tl.constexpr = False,
                     PERSIST: tl.constexpr = 0, UNROLL: tl.constexpr = None,
                     PDL: tl.constexpr = False):
    if PERSIST:
        # a fixed grid of programs walks the tiles (split index fastest, like K_FASTEST): no
        # per-program launch and ramp-up (tl.range(flatten=True), to pipeline across tiles,
        # compiled to the same SASS with Triton 3.6 and was dropped)
        n_tiles = tl.cdiv(N, BLOCK_N)
        total = n_tiles * tl.cdiv(M, BLOCK_M) * SPLIT_K
        for t in tl.range(tl.program_id(0), total, tl.num_programs(0)):
            pid_k = t % SPLIT_K
            pid_n = (t // SPLIT_K) % n_tiles
            pid_m = t // (SPLIT_K * n_tiles)
            _gemm_tile(pid_n, pid_m, pid_k, n_tiles, x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
                       ws_ptr, cnt_ptr, M, N, K, GROUP, stride_xm, stride_ym, stride_qn,
                       one_bits, ZERO_KIND, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GATHER,
                       EVEN_K, IEEE, SERIAL, GROUP_SHIFT, FRAG, NUM_WARPS, USE_ASM,
                       UNROLL, PDL, False)
        pdl_launch_next(PDL)  # after the whole walk, not after the first tile (see the helper)
    else:
        pid_n, pid_m, pid_k, n_tiles = tile_ids(K_FASTEST)
        _gemm_tile(pid_n, pid_m, pid_k, n_tiles, x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
                   ws_ptr, cnt_ptr, M, N, K, GROUP, stride_xm, stride_ym, stride_qn, one_bits,
                   ZERO_KIND, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GATHER, EVEN_K, IEEE,
                   SERIAL, GROUP_SHIFT, FRAG, NUM_WARPS, USE_ASM, UNROLL, PDL, PDL)


def int4_gemm(x, qweight, scales, zeros, zero_kind: int, group: int, bias, out,
              BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, GATHER=False, SERIAL=True,
              K_FASTEST=False, FRAG=0, PERSIST=0, UNROLL=None, PDL=False,
              num_warps=4, num_stages=3, **extra):
    """out [M, N] = x [M, K] @ W^T (+ bias) on tensor cores. ``out`` is preallocated.
    PDL: programmatic dependent launch where supported (see int4_gemv)."""
    M, K = x.shape
    N = qweight.shape[0]
    # FRAG is a speed option: tiles it cannot lay out (K tiles of 16 for group 16/48, N tiles
    # smaller than 16 rows per warp) take the interleaving unpack, with the same result
    # FRAG 2 (packed bf16x2/f16x2 dequantization) needs 16-bit activations and scales of the
    # same dtype (the scale is used in that dtype); otherwise FRAG 1
    FRAG = int(FRAG) if BLOCK_K % 32 == 0 and BLOCK_N % (16 * num_warps) == 0 else 0
    if FRAG == 2 and (x.dtype not in (torch.bfloat16, torch.float16) or scales.dtype != x.dtype
                      or (zero_kind == 2 and zeros.dtype != x.dtype)):
        FRAG = 1
    use_asm = FRAG == 2 and x.is_cuda and torch.version.hip is None and not interpreting()
    if FRAG == 2 and not use_asm and not interpreting():
        FRAG = 1  # no packed instructions here (XPU, ROCm): FRAG 1's fp32 route is cheaper
    n_tiles, m_tiles = triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M)
    grid, serial, K_FASTEST = splitk_grid(n_tiles, m_tiles, SPLIT_K, SERIAL, K_FASTEST)
    if PERSIST and not interpreting():  # PERSIST programs per SM walk all tiles
        grid = (min(n_tiles * m_tiles * SPLIT_K, int(PERSIST) * multiprocessors(x.device)),)
    elif PERSIST:  # the interpreter runs programs one by one: 3 programs still share tiles
        grid = (3,)
    ws = out if SPLIT_K == 1 else torch.empty((SPLIT_K, M, N), device=x.device,
                                              dtype=torch.float32)
    cnt = tile_counters(x.device) if serial else ws
    pdl = use_pdl(PDL, x.device)
    int4_gemm_kernel[grid](x, qweight, scales, zeros, bias if bias is not None else scales, out,
                           ws, cnt, M, N, K, group, x.stride(0), out.stride(0), qweight.stride(0),
                           ONE_BITS, ZERO_KIND=zero_kind, HAS_BIAS=bias is not None,
                           SPLIT_K=SPLIT_K, GROUP_SHIFT=group_shift(group, K), BLOCK_M=BLOCK_M,
                           BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GATHER=bool(GATHER),
                           EVEN_K=K % BLOCK_K == 0, IEEE=x.dtype == torch.float32 or interpreting(),
                           SERIAL=serial, K_FASTEST=K_FASTEST, FRAG=FRAG, USE_ASM=use_asm,
                           PERSIST=int(bool(PERSIST)), UNROLL=UNROLL, PDL=pdl,
                           NUM_WARPS=num_warps, num_warps=num_warps,
                           num_stages=num_stages, **pdl_launch_option(pdl), **extra)
    if SPLIT_K > 1 and not serial:
        splitk_reduce(ws, bias, out)
    return out
