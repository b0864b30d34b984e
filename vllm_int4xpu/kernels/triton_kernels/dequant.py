"""Large-M path: dequantize the whole weight to a dense [N, K] tile by tile, then a vendor GEMM.

At large M the GEMM is compute-bound and the dense library GEMM (cuBLAS / oneDNN) beats any
mixed-input kernel; the dequantization is one extra pass of ~2.5 bytes per weight element.
"""

import torch
import triton
import triton.language as tl

from .common import ONE_BITS, group_of, group_scale_offset, group_shift, unpack_along_k


@triton.jit
def int4_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, GROUP, stride_qn, stride_sg, one_bits,
                        ZERO_KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_SHIFT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    wk = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn + wk[None, :],
                    mask=n_mask[:, None] & (wk[None, :] < K // 8), other=0)
    s, b = group_scale_offset(s_ptr, z_ptr, group_of(k0, GROUP, GROUP_SHIFT), offs_n, n_mask,
                              stride_sg, ZERO_KIND)
    v = unpack_along_k(words, one_bits)  # 1 + q/16
    w = v * (16.0 * s)[:, None] + (b - 16.0 * s)[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
             w.to(w_ptr.dtype.element_ty), mask=n_mask[:, None] & (offs_k[None, :] < K))


def int4_dequantize(qweight, scales, zeros, zero_kind: int, group: int, dtype, K: int,
                    BLOCK_N=64, BLOCK_K=128, num_warps=4, out=None, row0=0, rows=None, **extra):
    """Dense weight rows [row0, row0 + rows) as [rows, K] in ``dtype`` (into ``out`` if given)."""
    N = qweight.shape[0]
    rows = N - row0 if rows is None else rows
    w = torch.empty((rows, K), device=qweight.device, dtype=dtype) if out is None else out
    grid = (triton.cdiv(rows, BLOCK_N), triton.cdiv(K, BLOCK_K))
    # row0 is folded into the pointers: the kernel sees a [rows, K] weight whose scale/zero
    # columns start at row0 (stride of scales stays N).
    int4_dequant_kernel[grid](qweight[row0:], scales[:, row0:], zeros[:, row0:] if zeros.dim() == 2
                              else zeros, w, rows, K, group, qweight.stride(0), N, ONE_BITS,
                              ZERO_KIND=zero_kind, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                              GROUP_SHIFT=group_shift(group, K),
                              num_warps=num_warps, **extra)
    return w


def int4_dequant_matmul(x, qweight, scales, zeros, zero_kind: int, group: int, bias,
                        CHUNK_N=0, **cfg):
    """x @ dequant(W)^T (+ bias) through torch's dense matmul.

    CHUNK_N > 0 dequantizes CHUNK_N output rows at a time into one reused buffer small enough
    to stay in L2, so the dense copy of the weight never round-trips through DRAM.
    """
    M, K = x.shape
    N = qweight.shape[0]
    if not CHUNK_N or CHUNK_N >= N:
        w = int4_dequantize(qweight, scales, zeros, zero_kind, group, x.dtype, K, **cfg)
        return torch.nn.functional.linear(x, w, bias)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    buf = torch.empty((CHUNK_N, K), device=x.device, dtype=x.dtype)
    for n0 in range(0, N, CHUNK_N):
        rows = min(CHUNK_N, N - n0)
        w = int4_dequantize(qweight, scales, zeros, zero_kind, group, x.dtype, K, out=buf[:rows],
                            row0=n0, rows=rows, **cfg)
        if bias is None:
            torch.mm(x, w.t(), out=out[:, n0:n0 + rows])
        else:
            torch.addmm(bias[n0:n0 + rows], x, w.t(), out=out[:, n0:n0 + rows])
    return out
