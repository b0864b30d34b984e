"""Pieces shared by the Triton int4 kernels: nibble unpacking, zero-point handling, split-K reduce.

Conventions of every kernel in this package (the canonical weight, DESIGN.md §1):

* ``qw``  int32 [N, K/8], code of k in word k//8 at bits 4*(k%8);
* ``s``   scales [G, N] (any float dtype, math in fp32);
* ``z``   ZERO_KIND 0: none (zp = 8) | 1: int8 zp [G, N], w = (q - zp)*s | 2: float z [G, N],
          w = (q - 8)*s + z.

A K tile never straddles two groups: the launcher picks BLOCK_K dividing the group size, or the
weight is per-channel (GROUP == K, so every tile is in group 0).
"""

import functools
import os

import triton
import triton.language as tl

try:  # programmatic dependent launch (sm_90+); a Triton build without the CUDA extras has none
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

ZERO_NONE, ZERO_INT, ZERO_FLOAT = 0, 1, 2

# float32 2**23: OR-ing a code into this bit pattern gives 2**23 + q exactly, which skips the slow
# int->float conversion instruction (a plain fp32 subtract does the rest).
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC = tl.constexpr(8388608.0)


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU emulation, whose bf16 tl.dot is wrong: dot in fp32).

    Read once per process (Triton itself fixes the mode when the kernels are defined), so eager
    launches do not pay an environment lookup each."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def codes_to_float(q):
    """int32 codes in 0..15 -> fp32, exactly (OR into 2**23, subtract 2**23)."""
    return (q | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC


ONE_BITS = 0x3F800000  # fp32 1.0; kernels take it as a *runtime* argument (see nibble_as_float)


@triton.jit
def nibble_as_float(words, j: tl.constexpr, one_bits):
    """Nibble j of each word as the fp32 1 + q/16, exactly: the code is moved to the top mantissa
    bits (19..22) of 1.0, which costs a shift and one and-or, with no int->float conversion.

    ``one_bits`` (= ONE_BITS) is passed in at run time on purpose: with both masks as immediates
    the and-or needs two LOP3 instructions (LOP3 has one immediate slot); with 1.0 in a register
    ptxas fuses it into one.
    """
    if j < 5:
        bits = words << (19 - 4 * j)
    else:
        bits = words >> (4 * j - 19)
    return ((bits & 0x00780000) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def nibble_pair_as_float(words, p: tl.constexpr, one_bits):
    """Nibbles 2p+1 and 2p of each word from ONE shift: the shift puts nibble 2p+1 at bits 19..22
    and so nibble 2p at bits 15..18; each and-or with 1.0's bits then gives an exact fp32:
    hi = 1 + q_{2p+1}/16 and lo = 1 + q_{2p}/256 (one shift + two LOP3 for two weights).
    """
    if p < 2:
        sh = words << (15 - 8 * p)
    else:
        sh = words >> (8 * p - 15)  # sign bits shifted in land outside both masks
    hi = ((sh & 0x00780000) | one_bits).to(tl.float32, bitcast=True)
    lo = ((sh & 0x00078000) | one_bits).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def unpack_along_k(words, one_bits):
    """int32 words [R, W] -> fp32 [R, 8W] holding 1 + q/16 (element 8w + j = nibble j of word w).

    Callers fold the affine map into their scale: q*s + b == v*(16 s) + (b - 16 s) for v = 1 + q/16.
    Built from interleaves so that all 8 nibbles of a word stay in one thread (a plain
    broadcast-and-reshape lets the compiler spread them over 8 lanes, each re-reading the word).
    """
    even = tl.interleave(
        tl.interleave(nibble_as_float(words, 0, one_bits), nibble_as_float(words, 4, one_bits)),
        tl.interleave(nibble_as_float(words, 2, one_bits), nibble_as_float(words, 6, one_bits)))
    odd = tl.interleave(
        tl.interleave(nibble_as_float(words, 1, one_bits), nibble_as_float(words, 5, one_bits)),
        tl.interleave(nibble_as_float(words, 3, one_bits), nibble_as_float(words, 7, one_bits)))
    return tl.interleave(even, odd)


@triton.jit
def group_of(k, GROUP, GROUP_SHIFT: tl.constexpr):
    """Group index of input channel k: a shift for power-of-two groups (GROUP_SHIFT >= 0, 30 for
    per-channel), else an integer division (GROUP_SHIFT = -1) that costs ~25 instructions."""
    if GROUP_SHIFT >= 0:
        return k >> GROUP_SHIFT
    else:
        return k // GROUP


def group_shift(group: int, K: int) -> int:
    """The GROUP_SHIFT constexpr for a group size (see :func:`group_of`)."""
    if group >= K:
        return 30  # per-channel: every k is in group 0
    return group.bit_length() - 1 if group & (group - 1) == 0 else -1


@triton.jit
def group_scale_offset(s_ptr, z_ptr, g, offs_n, n_mask, N, ZERO_KIND: tl.constexpr):
    """fp32 (scale, offset) vectors [BN] of group g so that w = q*scale + offset."""
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if ZERO_KIND == 1:
        zp = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        b = -zp * s
    elif ZERO_KIND == 2:
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        b = z - 8.0 * s
    else:
        b = -8.0 * s
    return s, b


@triton.jit
def tile_ids(K_FASTEST: tl.constexpr):
    """(pid_n, pid_m, pid_k, number of N tiles) of this program for the grid of
    :func:`splitk_grid`: K_FASTEST puts the split index first, so the K splits of one N tile run
    side by side and read whole weight rows together."""
    if K_FASTEST:
        return tl.program_id(1), tl.program_id(2), tl.program_id(0), tl.num_programs(1)
    else:
        return tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0)


def splitk_grid(n_tiles: int, m_tiles: int, split_k: int, serial: bool, k_fastest: bool):
    """(grid, serial, k_fastest) of a split-K launch: the serial reduction needs one counter per
    (N, M) tile (at most MAX_TILES); the split-first order needs split-K and N, M tiles that fit
    the grid's y/z limit (65535)."""
    serial = bool(serial) and split_k > 1 and n_tiles * m_tiles <= MAX_TILES
    k_fastest = bool(k_fastest) and split_k > 1 and max(n_tiles, m_tiles) <= 65535
    grid = (split_k, n_tiles, m_tiles) if k_fastest else (n_tiles, m_tiles, split_k)
    return grid, serial, k_fastest


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, M, N, stride_ym,
                         SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = sum_s ws[s, m, n] (+ bias[n]), cast to y's dtype; ws is fp32 [SPLIT_K, M, N]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    m = offs // N
    tl.store(y_ptr + m * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def splitk_serial_reduce(acc, ws_ptrs, split_stride, mask, cnt_ptr, pid_k,
                         SPLIT_K: tl.constexpr):
    """Split-K without a second kernel: every split stores its fp32 partial, then bumps a
    per-tile counter; the split that arrives last sums all partials and resets the counter to 0
    (so the counter buffer is ready for the next launch, CUDA graph replays included).
    Returns (total, count); the split with count == SPLIT_K - 1 holds the complete total.
    """
    tl.store(ws_ptrs + pid_k * split_stride, acc, mask=mask)
    tl.debug_barrier()  # all of this program's partial stores are issued before the release
    count = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = count == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if is_last:
        for s in tl.static_range(SPLIT_K):
            total += tl.load(ws_ptrs + s * split_stride, mask=mask, other=0.0,
                             cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
    return total, count


@triton.jit
def pdl_launch_next(PDL: tl.constexpr):
    """With PDL: the next kernel on the stream may launch once every program of this grid has
    called this. Kernels call it after their K loop, so the next grid's programs fill the slots
    this grid's tail frees. Called first thing, the next grids' programs took SM slots early and
    unevenly: 1.1-1.3x slower on single-wave grids (sweep_pdl_early_trigger_h100.txt)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With PDL: block until the kernel before this one has finished and its writes are visible.
    Everything before this call may only read the weight (never written at run time), never x,
    y or the split-K workspace and counters."""
    if PDL:
        gdc_wait()


ENV_PDL = "VLLM_INT4XPU_PDL"  # "1": launch gemv/gemm with PDL where supported; "0": never
_PDL_ENV = os.environ.get(ENV_PDL, "")  # read once: launches stay free of environment lookups


@functools.lru_cache(maxsize=None)
def pdl_supported(device) -> bool:
    """Programmatic dependent launch: CUDA (not ROCm) sm_90+, compiled (not the interpreter)."""
    import torch
    device = torch.device(device)
    return (device.type == "cuda" and torch.version.hip is None and not interpreting()
            and gdc_wait is not None and torch.cuda.get_device_capability(device) >= (9, 0))


def pdl_launch_option(pdl: bool) -> dict:
    """The launch keyword for PDL, only when on: Triton rejects keywords its backend does not
    know, and not every backend (Intel's XPU one) need know ``launch_pdl``."""
    return {"launch_pdl": True} if pdl else {}


def use_pdl(requested, device) -> bool:
    """Whether a launch uses PDL: VLLM_INT4XPU_PDL=1/0 forces it on/off, else the config's PDL
    option decides; never where unsupported. Off by default: on H100 it paid only between
    back-to-back int4 GEMMs, not after the ordinary kernels that precede a linear layer in a
    model (benchmarks/tuning/pdl_neighbours.py)."""
    if _PDL_ENV not in ("", "0", "1"):
        from ...errors import Int4FormatError
        raise Int4FormatError("bad value of the PDL switch", tensor=ENV_PDL,
                              expected="0, 1 or unset", found=repr(_PDL_ENV))
    want = _PDL_ENV == "1" if _PDL_ENV else bool(requested)
    return want and pdl_supported(device)


@functools.lru_cache(maxsize=None)
def multiprocessors(device) -> int:
    """Streaming multiprocessors (CUDA) / Xe cores (XPU) of ``device``, for persistent grids."""
    import torch
    device = torch.device(device)
    props = getattr(torch, device.type).get_device_properties(device)
    for name in ("multi_processor_count", "gpu_subslice_count", "max_compute_units"):
        if getattr(props, name, 0):
            return int(getattr(props, name))
    return 1


_COUNTERS: dict = {}
MAX_TILES = 1 << 16


def tile_counters(device) -> "torch.Tensor | None":
    """A zeroed int32 buffer per device for :func:`splitk_serial_reduce` (kernels leave it zeroed).

    Launches that share it must be ordered (one stream), as vLLM's forward pass is.
    """
    import torch
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def splitk_reduce(ws, bias, y):
    """Launch :func:`splitk_reduce_kernel` (ws fp32 [S, M, N] -> y [M, N])."""
    split_k, M, N = ws.shape
    block = 1024
    grid = (triton.cdiv(M * N, block),)
    splitk_reduce_kernel[grid](ws, bias if bias is not None else ws, y, M, N, y.stride(0),
                               SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block)
    return y
