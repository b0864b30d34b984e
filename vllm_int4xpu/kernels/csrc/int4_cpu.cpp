// int4 weight-only GEMM on the CPU: y[M, N] = x[M, K] @ w^T, fp32 accumulation, every M.
//
// Weight layout (written once at load by int4_pack_blocks; one copy of the codes):
//   qb uint8 [NB, K/2, 16], NB = ceil(N/16): block j holds output channels 16j..16j+15
//      (channels past N hold code 0) as K/8 chunks of 64 bytes. Chunk t holds the pair rows
//      p = 4t..4t+3 (k = 2p, 2p+1) as 32 little-endian 16-bit words: word 2c + h holds the codes
//      of k = 2p + h of channel c, the code of row p = 4t + n in bits 4n..4n+3 (code_at). A shift
//      and a mask per row then put the codes of row p where the bf16 pairs (16 + q_2p,
//      16 + q_2p+1) of all 16 channels have their mantissas (chunk_pairs): VNNI order, one
//      dword per channel, as VDPBF16PS and AMX B tiles take it;
//   sb float32 [NB, G, 2, 16]: per block, group g and channel c the scale s and the offset
//      b' = b - 16 s, where w = q * s + b (b = -zp*s for integer zero points, z - 8 s for float
//      ones, -8 s symmetric).
// Every path multiplies the exact codes as (16 + q) (16..31 are exact in bf16) and applies
// s per group and b' through the group sums of x: y = sum_g s_g . sum_k (16 + q) x + b'_g sum_k x.
//
// Paths (C ABI, loaded with ctypes; no torch headers, so the build takes seconds):
//   * bf16 x on a CPU with AMX: per block of 16 channels, the codes of the whole K become AMX B
//     tiles once (16 K-pairs x 16 channels, VNNI order, 1 KB each), then every block of up to 16
//     rows of x runs TDPBF16PS over them, one C tile per group, scaled and summed in registers;
//   * bf16 x with AVX512-BF16 (decode on AMX CPUs; every M below the dense path without AMX):
//     the codes become the same bf16 pairs in registers, VDPBF16PS with up to 8 rows of x;
//   * otherwise (fp32/fp16 x, or no AVX512-BF16) with AVX-512: the same blocks as an outer
//     product, 16 channels per vector, up to 8 rows of x per pass, fp32 FMAs;
//   * no AVX-512: the same arithmetic in scalar loops.
// Threads: OpenMP over the channel blocks, nthreads given by the caller (torch's count; the
// library links the libgomp torch has loaded, so the threads are torch's).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || defined(__AMX_TILE__)
#include <immintrin.h>
#endif

namespace {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalize
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; --exp; }
            u = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000;
    int32_t exp = int32_t((u >> 23) & 0xff) - 127 + 15;
    uint32_t man = u & 0x7fffff;
    if (((u >> 23) & 0xff) == 0xff) return uint16_t(sign | 0x7c00 | (man ? 0x200 : 0));
    if (exp >= 31) return uint16_t(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return uint16_t(sign);
        man |= 0x800000;
        int shift = 14 - exp;
        uint32_t half = 1u << (shift - 1), rest = man & ((1u << shift) - 1);
        uint32_t r = man >> shift;
        if (rest > half || (rest == half && (r & 1))) ++r;
        return uint16_t(sign | r);
    }
    uint32_t r = (uint32_t(exp) << 10) | (man >> 13), rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (r & 1))) ++r;
    return uint16_t(sign | r);
}

inline float load_as_f32(const void* p, int64_t i, int dt) {
    if (dt == F32) return static_cast<const float*>(p)[i];
    uint16_t h = static_cast<const uint16_t*>(p)[i];
    return dt == BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

inline void store_from_f32(void* p, int64_t i, float v, int dt) {
    if (dt == F32) static_cast<float*>(p)[i] = v;
    else if (dt == BF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    else static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
}

// Group sums [M, G] in fp32 of x [M, K], element i read as load(i).
template <typename Load>
std::vector<float> group_sums(int64_t M, int64_t K, int64_t group, Load load) {
    const int64_t G = K / group;
    std::vector<float> xs(size_t(M * G));
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) {
            float s = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) s += load(m * K + k);
            xs[m * G + g] = s;
        }
    return xs;
}

#ifdef __AVX512F__
// 16 elements of x from element i on, as fp32 (bf16: a shift; fp16: F16C).
inline __m512 load16_f32(const void* x, int64_t i, int dt) {
    if (dt == F32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
    const __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    return dt == BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                      : _mm512_cvtph_ps(h);
}
#endif

// x as fp32 [M, K] and its group sums [M, G] (rows spread over the threads).
void x_f32_and_group_sums(const void* x, int dt, int64_t M, int64_t K, int64_t group,
                          std::vector<float>& xf, std::vector<float>& xs, int nthreads) {
    xf.resize(size_t(M * K));
#ifdef __AVX512F__
    if (group % 16 == 0) {  // 16 elements per vector: F16C / bf16 shifts, vector group sums
        const int64_t G = K / group;
        xs.resize(size_t(M * G));
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t g = 0; g < G; ++g) {
                __m512 a = _mm512_setzero_ps();
                for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
                    const int64_t i = m * K + k;
                    const __m512 v = load16_f32(x, i, dt);
                    _mm512_storeu_ps(xf.data() + i, v);
                    a = _mm512_add_ps(a, v);
                }
                xs[size_t(m * G + g)] = _mm512_reduce_add_ps(a);
            }
        return;
    }
#endif
    (void)nthreads;
    for (int64_t i = 0; i < M * K; ++i) xf[i] = load_as_f32(x, i, dt);
    const float* f = xf.data();
    xs = group_sums(M, K, group, [f](int64_t i) { return f[i]; });
}

// Byte of a block holding the code of k = 2p + h of channel c, and the nibble's shift in it
// (see the layout at the top).
inline int64_t code_byte(int64_t p, int64_t c, int h) {
    return (p >> 2) * 64 + 2 * (2 * c + h) + ((p & 3) >> 1);
}
inline int code_shift(int64_t p) { return 4 * int(p & 1); }
inline int code_at(const uint8_t* qj, int64_t p, int64_t c, int h) {
    return (qj[code_byte(p, c, h)] >> code_shift(p)) & 0x0f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 fp32 -> 16 bf16 as f32_to_bf16 rounds them: integer round to nearest even, NaN kept quiet.
inline __m256i bf16_round(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}
#endif

// Up to 16 values (one block row) into y as its dtype, rounded as store_from_f32 rounds them
// (vectors where AVX-512 has them: a scalar loop per element costs more than a short K's
// whole GEMM at many rows).
void store_block_row(void* y, int y_dt, int64_t row, int64_t N, int64_t n0, const float* v) {
    const int64_t cols = std::min<int64_t>(16, N - n0);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    const __mmask16 m = __mmask16((1u << cols) - 1u);
    const __m512 f = _mm512_maskz_loadu_ps(m, v);
    const int64_t i = row * N + n0;
    if (y_dt == F32) {
        _mm512_mask_storeu_ps(static_cast<float*>(y) + i, m, f);
        return;
    }
    const __m256i h = y_dt == BF16 ? bf16_round(f)
                                   : _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + i, m, h);
#else
    for (int64_t c = 0; c < cols; ++c) store_from_f32(y, row * N + n0 + c, v[c], y_dt);
#endif
}

// The vector paths' loop: channel blocks spread over the threads, rows of x up to RB at a time;
// block(j, m0, R, out) computes out[R][16] for block j and rows m0..m0+R-1, stored here into y.
template <int RB, typename Block>
void over_blocks_by_rows(int64_t M, int64_t N, void* y, int y_dt, int nthreads, Block block) {
    const int64_t NB = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < NB; ++j) {
        float out[RB * 16];
        for (int64_t m0 = 0; m0 < M; m0 += RB) {
            const int R = int(std::min<int64_t>(RB, M - m0));
            block(j, m0, R, out);
            for (int r = 0; r < R; ++r) store_block_row(y, y_dt, m0 + r, N, j * 16, out + 16 * r);
        }
    }
}

#ifdef __AVX512F__
// Software prefetch this many bytes ahead in a block's codes (blocks are contiguous, so it runs
// on into the next block). Weights streamed once per call from memory (decode, layers too large
// for the caches) otherwise arrive at the hardware prefetchers' pace: 10-40 % slower decode on a
// 2-core Xeon (one SmolLM2 / 1B-Llama decode step of int4 linears, same run).
constexpr int64_t PREFETCH_BYTES = 4096;
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
// The scale and offset rows (2 x 64 bytes) of the group 4 groups after g of a block.
inline void prefetch_group_scales(const float* sbj, int64_t g) {
    prefetch(sbj + (g + 4) * 32);
    prefetch(sbj + (g + 4) * 32 + 16);
}

// One chunk (64 bytes: pair rows p..p+3 of a block) -> 4 vectors of 16 dwords, dword c of
// vector n = the bf16 pair (16 + q_2(p+n), 16 + q_2(p+n)+1) of channel c, which is also row n of
// an AMX B tile. bf16(16 + q) = 0x4180 | (q << 3): per row one 32-bit shift brings the nibbles
// of both words to bits 3..6, and a mask and an or (one VPTERNLOGD) finish the pairs.
inline void chunk_pairs(const uint8_t* chunk, __m512i* out) {
    const __m512i w = _mm512_loadu_si512(chunk);
    const __m512i mask = _mm512_set1_epi32(0x00780078), one6 = _mm512_set1_epi32(0x41804180);
    out[0] = _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi32(w, 3), mask), one6);
    out[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w, 1), mask), one6);
    out[2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w, 5), mask), one6);
    out[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w, 9), mask), one6);
}

// The fp32 values (16 + q) of k = 2p (lo) and 2p + 1 (hi) from one vector of chunk_pairs.
inline __m512 pairs_lo(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 pairs_hi(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
}

// Dequantized fp32 weights of k = 2p and 2p + 1 from one vector of chunk_pairs: q s + b with
// b = 16 s + b' given (vb), rounded once as the reference dequantization rounds it.
inline void pairs_dequant(__m512i v, __m512 vs, __m512 vb, __m512& lo, __m512& hi) {
    const __m512 sixteen = _mm512_set1_ps(16.f);
    lo = _mm512_fmadd_ps(_mm512_sub_ps(pairs_lo(v), sixteen), vs, vb);
    hi = _mm512_fmadd_ps(_mm512_sub_ps(pairs_hi(v), sixteen), vs, vb);
}

// fp32 outer product: one block of 16 channels, rows [m0, m0 + R) of x.
template <int R>
void block_fma(const float* xf, const float* xs, const uint8_t* qj, const float* sbj, int64_t K,
               int64_t G, int64_t group, int64_t m0, float* out /* [R][16] */) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m512 accg[R];
        for (int r = 0; r < R; ++r) accg[r] = _mm512_setzero_ps();
        prefetch_group_scales(sbj, g);
        for (int64_t p = g * group / 2; p < (g + 1) * group / 2; p += 4) {
            __m512i w[4];
            prefetch(qj + p * 16 + PREFETCH_BYTES);
            chunk_pairs(qj + p * 16, w);
            for (int n = 0; n < 4; ++n) {
                const __m512 lo = pairs_lo(w[n]), hi = pairs_hi(w[n]);
                for (int r = 0; r < R; ++r) {
                    const float* xr = xf + (m0 + r) * K + 2 * (p + n);
                    accg[r] = _mm512_fmadd_ps(lo, _mm512_set1_ps(xr[0]), accg[r]);
                    accg[r] = _mm512_fmadd_ps(hi, _mm512_set1_ps(xr[1]), accg[r]);
                }
            }
        }
        const __m512 s = _mm512_loadu_ps(sbj + g * 32), bo = _mm512_loadu_ps(sbj + g * 32 + 16);
        for (int r = 0; r < R; ++r)
            acc[r] = _mm512_fmadd_ps(bo, _mm512_set1_ps(xs[(m0 + r) * G + g]),
                                     _mm512_fmadd_ps(accg[r], s, acc[r]));
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + 16 * r, acc[r]);
}
#endif

void gemm_fma(const void* x, int x_dt, int64_t M, int64_t K, const uint8_t* qb, const float* sb,
              int64_t N, int64_t group, void* y, int y_dt, int nthreads) {
    const int64_t G = K / group;
    std::vector<float> xf, xs;
    x_f32_and_group_sums(x, x_dt, M, K, group, xf, xs, nthreads);
    over_blocks_by_rows<8>(M, N, y, y_dt, nthreads, [&](int64_t j, int64_t m0, int R, float* out) {
        const uint8_t* qj = qb + j * (K / 2) * 16;
        const float* sbj = sb + j * G * 32;
#ifdef __AVX512F__
        switch (R) {
            case 8: block_fma<8>(xf.data(), xs.data(), qj, sbj, K, G, group, m0, out); break;
            case 7: block_fma<7>(xf.data(), xs.data(), qj, sbj, K, G, group, m0, out); break;
            case 6: block_fma<6>(xf.data(), xs.data(), qj, sbj, K, G, group, m0, out); break;
            case 5: block_fma<5>(xf.data(), xs.data(), qj, sbj, K, G, group, m0, out); break;
            case 4: block_fma<4>(xf.data(), xs.data(), qj, sbj, K, G, group, m0, out); break;
            case 3: block_fma<3>(xf.data(), xs.data(), qj, sbj, K, G, group, m0, out); break;
            case 2: block_fma<2>(xf.data(), xs.data(), qj, sbj, K, G, group, m0, out); break;
            default: block_fma<1>(xf.data(), xs.data(), qj, sbj, K, G, group, m0, out);
        }
#else
        for (int r = 0; r < R; ++r) {
            const float* xr = xf.data() + (m0 + r) * K;
            for (int c = 0; c < 16; ++c) {
                float acc = 0.f;
                for (int64_t g = 0; g < G; ++g) {
                    float accg = 0.f;
                    for (int64_t p = g * group / 2; p < (g + 1) * group / 2; ++p) {
                        accg += (16.f + float(code_at(qj, p, c, 0))) * xr[2 * p] +
                                (16.f + float(code_at(qj, p, c, 1))) * xr[2 * p + 1];
                    }
                    acc += sbj[g * 32 + c] * accg + sbj[g * 32 + 16 + c] * xs[(m0 + r) * G + g];
                }
                out[16 * r + c] = acc;
            }
        }
#endif
    });
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define INT4_HAVE_DP 1

// Group sums [M, G] in fp32 of bf16 x (groups are multiples of 16: one vector per 16 channels).
std::vector<float> group_sums_bf16(const uint16_t* xb, int64_t M, int64_t K, int64_t group) {
    const int64_t G = K / group;
    std::vector<float> xs(size_t(M * G));
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) {
            const uint16_t* xg = xb + m * K + g * group;
            __m512 a = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 16 <= group; k += 16) a = _mm512_add_ps(a, load16_f32(xg, k, BF16));
            float t = _mm512_reduce_add_ps(a);
            for (; k < group; ++k) t += bf16_to_f32(xg[k]);
            xs[m * G + g] = t;
        }
    return xs;
}

// acc += w . x's pair *x broadcast, the broadcast embedded in VDPBF16PS's memory operand: GCC
// otherwise emits a separate VPBROADCASTD per product, which on Zen 4 competes with the dot
// products for the vector pipes (10-17 % of the time at 16-128 rows, bench_cpu.py on an EPYC).
inline void dp_bcast(__m512& acc, __m512i w, const int32_t* x) {
    asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
}

// bf16 x, up to 8 rows at a time (decode and small batches, and every M below the dense path
// on CPUs without AMX): the codes become bf16 pairs (16 + q_2p, 16 + q_2p+1) in registers
// (chunk_pairs) and VDPBF16PS multiplies them with x's pair broadcast, 16 channels per
// vector. U chunks of 4 pair rows per step give each row 2U independent accumulators (U = 2 for
// up to 4 rows, so that few rows still keep enough dot products in flight).
template <int R, int U>
void block_dp(const uint16_t* xb, const float* xs, const uint8_t* qj, const float* sbj,
              int64_t K, int64_t G, int64_t group, float* out /* [R][16] */) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m512 a[R][2 * U];
        for (int r = 0; r < R; ++r)
            for (int u = 0; u < 2 * U; ++u) a[r][u] = _mm512_setzero_ps();
        prefetch_group_scales(sbj, g);
        for (int64_t p = g * group / 2; p < (g + 1) * group / 2; p += 4 * U) {
            __m512i w[4 * U];
            for (int u = 0; u < U; ++u) prefetch(qj + (p + 4 * u) * 16 + PREFETCH_BYTES);
            for (int u = 0; u < U; ++u) chunk_pairs(qj + (p + 4 * u) * 16, w + 4 * u);
            for (int r = 0; r < R; ++r) {
                const int32_t* xp = reinterpret_cast<const int32_t*>(xb + r * K) + p;
                for (int i = 0; i < 4 * U; ++i) dp_bcast(a[r][i % (2 * U)], w[i], xp + i);
            }
        }
        const __m512 s = _mm512_loadu_ps(sbj + g * 32), bo = _mm512_loadu_ps(sbj + g * 32 + 16);
        for (int r = 0; r < R; ++r) {
            __m512 t = a[r][0];
            for (int u = 1; u < 2 * U; ++u) t = _mm512_add_ps(t, a[r][u]);
            acc[r] = _mm512_fmadd_ps(bo, _mm512_set1_ps(xs[r * G + g]),
                                     _mm512_fmadd_ps(t, s, acc[r]));
        }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

void gemm_dp(const uint16_t* xb, int64_t M, int64_t K, const uint8_t* qb, const float* sb,
             int64_t N, int64_t group, void* y, int y_dt, int nthreads) {
    const int64_t G = K / group;
    const std::vector<float> xs = group_sums_bf16(xb, M, K, group);
    over_blocks_by_rows<8>(M, N, y, y_dt, nthreads, [&](int64_t j, int64_t m0, int R, float* out) {
        const uint8_t* qj = qb + j * (K / 2) * 16;
        const float* sbj = sb + j * G * 32;
        const uint16_t* xr = xb + m0 * K;
        const float* xsr = xs.data() + m0 * G;
        switch (R) {
            case 8: block_dp<8, 1>(xr, xsr, qj, sbj, K, G, group, out); break;
            case 7: block_dp<7, 1>(xr, xsr, qj, sbj, K, G, group, out); break;
            case 6: block_dp<6, 1>(xr, xsr, qj, sbj, K, G, group, out); break;
            case 5: block_dp<5, 1>(xr, xsr, qj, sbj, K, G, group, out); break;
            case 4: block_dp<4, 2>(xr, xsr, qj, sbj, K, G, group, out); break;
            case 3: block_dp<3, 2>(xr, xsr, qj, sbj, K, G, group, out); break;
            case 2: block_dp<2, 2>(xr, xsr, qj, sbj, K, G, group, out); break;
            default: block_dp<1, 2>(xr, xsr, qj, sbj, K, G, group, out);
        }
    });
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(INT4_HAVE_DP)
#define INT4_HAVE_AMX 1

struct alignas(64) TileConfig {
    uint8_t palette_id = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// tile 0: C (rows x 16 fp32), tile 1: A (rows x 32 bf16 of x), tile 2: B (16 pairs x 16 cols)
void configure_tiles(int rows) {
    TileConfig cfg;
    cfg.colsb[0] = 64; cfg.rows[0] = uint8_t(rows);
    cfg.colsb[1] = 64; cfg.rows[1] = uint8_t(rows);
    cfg.colsb[2] = 64; cfg.rows[2] = 16;
    _tile_loadconfig(&cfg);
}

void gemm_amx(const uint16_t* xb, int64_t M, int64_t K, const uint8_t* qb, const float* sb,
              int64_t N, int64_t group, void* y, int y_dt, int nthreads) {
    const int64_t G = K / group, NB = (N + 15) / 16, steps = K / 32, steps_g = group / 32;
    const std::vector<float> xs = group_sums_bf16(xb, M, K, group);
#pragma omp parallel num_threads(nthreads)
    {
        // B tiles of one channel block over the whole K: steps x 1 KB, reused by every row block
        std::vector<__m512i> btiles(size_t(steps * 16));
        alignas(64) float cbuf[16 * 16];
        int configured = -1;
#pragma omp for schedule(static)
        for (int64_t j = 0; j < NB; ++j) {
            const uint8_t* qj = qb + j * (K / 2) * 16;
            const float* sbj = sb + j * G * 32;
            for (int64_t p = 0; p < K / 2; p += 4) {
                prefetch(qj + p * 16 + PREFETCH_BYTES);
                chunk_pairs(qj + p * 16, &btiles[size_t(p)]);
            }
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                const int rows = int(std::min<int64_t>(16, M - m0));
                if (rows != configured) {
                    configure_tiles(rows);
                    configured = rows;
                }
                __m512 acc[16];
                for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
                for (int64_t g = 0; g < G; ++g) {
                    _tile_zero(0);
                    for (int64_t t = g * steps_g; t < (g + 1) * steps_g; ++t) {
                        _tile_loadd(1, xb + m0 * K + t * 32, K * 2);
                        _tile_loadd(2, &btiles[size_t(t * 16)], 64);
                        _tile_dpbf16ps(0, 1, 2);
                    }
                    _tile_stored(0, cbuf, 64);
                    const __m512 s = _mm512_loadu_ps(sbj + g * 32);
                    const __m512 bo = _mm512_loadu_ps(sbj + g * 32 + 16);
                    for (int r = 0; r < rows; ++r)
                        acc[r] = _mm512_fmadd_ps(
                            bo, _mm512_set1_ps(xs[(m0 + r) * G + g]),
                            _mm512_fmadd_ps(_mm512_load_ps(cbuf + 16 * r), s, acc[r]));
                }
                float out[16];
                for (int r = 0; r < rows; ++r) {
                    _mm512_storeu_ps(out, acc[r]);
                    store_block_row(y, y_dt, m0 + r, N, j * 16, out);
                }
            }
        }
        if (configured >= 0) _tile_release();
    }
}

// One pair row (a vector of chunk_pairs) -> 16 VNNI pairs (w_2p, w_2p+1) of the dequantized
// weights in bf16 (pairs_dequant, rounded once more to bf16), for the many-row path.
inline __m512i pair_row_dequant(__m512i v, __m512 vs, __m512 vb, __m512i interleave) {
    __m512 lo, hi;
    pairs_dequant(v, vs, vb, lo, hi);
    // [lo0..lo15 | hi0..hi15] -> lo0 hi0 lo1 hi1 ...
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Many rows: the weights are dequantized to bf16 B tiles once per call (two blocks of 16
// channels per thread step), and C accumulates over the whole K (no per-group flush); each A
// tile of x feeds both blocks. Same numerics as a dense bf16 copy of the dequantized weights.
void gemm_amx_dense_rows(const uint16_t* xb, int64_t M, int64_t K, const uint8_t* qb,
                         const float* sb, int64_t N, int64_t group, void* y, int y_dt,
                         int64_t row0, int nthreads) {
    const int64_t G = K / group, NB = (N + 15) / 16, steps = K / 32, P = K / 2;
    const int64_t NP = (NB + 1) / 2;  // pairs of blocks
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<__m512i> bt(size_t(2 * steps * 16));
        alignas(64) float cbuf[16 * 16];
        alignas(64) uint16_t idx[32];
        for (int i = 0; i < 16; ++i) { idx[2 * i] = uint16_t(i); idx[2 * i + 1] = uint16_t(16 + i); }
        const __m512i interleave = _mm512_load_si512(idx);
        int configured = -1;
#pragma omp for schedule(static)
        for (int64_t jp = 0; jp < NP; ++jp) {
            const int nblk = (2 * jp + 1 < NB) ? 2 : 1;
            for (int b = 0; b < nblk; ++b) {
                const int64_t j = 2 * jp + b;
                const uint8_t* qj = qb + j * P * 16;
                const float* sbj = sb + j * G * 32;
                for (int64_t g = 0; g < G; ++g) {
                    const __m512 vs = _mm512_loadu_ps(sbj + g * 32);
                    const __m512 vb = _mm512_fmadd_ps(_mm512_set1_ps(16.f), vs,
                                                      _mm512_loadu_ps(sbj + g * 32 + 16));
                    for (int64_t p = g * group / 2; p < (g + 1) * group / 2; p += 4) {
                        __m512i w[4];
                        prefetch(qj + p * 16 + PREFETCH_BYTES);
                        chunk_pairs(qj + p * 16, w);
                        for (int n = 0; n < 4; ++n)
                            bt[size_t(b * steps * 16 + p + n)] = pair_row_dequant(w[n], vs, vb,
                                                                                   interleave);
                    }
                }
            }
            // 2 x 2 micro-kernel: rows m0..m0+31 (A0, A1) x the two blocks (B0, B1) -> C0..C3
            for (int64_t m0 = 0; m0 < M; m0 += 32) {
                const int r0 = int(std::min<int64_t>(16, M - m0));
                const int r1 = int(std::max<int64_t>(0, std::min<int64_t>(16, M - m0 - 16)));
                const int key = r0 * 32 + r1;
                if (key != configured) {
                    TileConfig cfg;  // C0 C1 (rows r0), C2 C3 (rows r1), A0, A1, B0, B1
                    const uint8_t h1 = uint8_t(r1 ? r1 : 1);
                    for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64;
                    cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = uint8_t(r0);
                    cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = h1;
                    cfg.rows[6] = cfg.rows[7] = 16;
                    _tile_loadconfig(&cfg);
                    configured = key;
                }
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                const uint16_t* a0 = xb + m0 * K;
                const uint16_t* a1 = xb + (m0 + 16) * K;
                const __m512i* b0 = bt.data();
                const __m512i* b1 = bt.data() + steps * 16;
                for (int64_t t = 0; t < steps; ++t) {
                    _tile_loadd(4, a0 + t * 32, K * 2);
                    _tile_loadd(6, b0 + t * 16, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (nblk == 2) {
                        _tile_loadd(7, b1 + t * 16, 64);
                        _tile_dpbf16ps(1, 4, 7);
                    }
                    if (r1) {
                        _tile_loadd(5, a1 + t * 32, K * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        if (nblk == 2) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                for (int b = 0; b < nblk; ++b)
                    for (int h = 0; h < (r1 ? 2 : 1); ++h) {
                        const int c = 2 * h + b;
                        if (c == 0) _tile_stored(0, cbuf, 64);
                        else if (c == 1) _tile_stored(1, cbuf, 64);
                        else if (c == 2) _tile_stored(2, cbuf, 64);
                        else _tile_stored(3, cbuf, 64);
                        const int rows = h ? r1 : r0;
                        for (int r = 0; r < rows; ++r)
                            store_block_row(y, y_dt, row0 + m0 + 16 * h + r, N,
                                            (2 * jp + b) * 16, cbuf + 16 * r);
                    }
            }
        }
        if (configured >= 0) _tile_release();
    }
}

// Row chunks of x small enough to stay in L2 while every block of w passes over them; the
// weights are dequantized again per chunk (cheaper than streaming x from memory per block).
void gemm_amx_dense(const uint16_t* xb, int64_t M, int64_t K, const uint8_t* qb, const float* sb,
                    int64_t N, int64_t group, void* y, int y_dt, int nthreads) {
    const int64_t chunk = std::max<int64_t>(128, (int64_t(1) << 20) / (2 * K) / 32 * 32);
    for (int64_t m0 = 0; m0 < M; m0 += chunk)
        gemm_amx_dense_rows(xb + m0 * K, std::min(chunk, M - m0), K, qb, sb, N, group, y, y_dt,
                            m0, nthreads);
}
#endif

}  // namespace

extern "C" {

// Bit 0: AVX-512 vector path built in; bit 1: AMX path; bit 2: AVX512-BF16 dot-product path.
int int4_cpu_features() {
    int f = 0;
#ifdef __AVX512F__
    f |= 1;
#endif
#ifdef INT4_HAVE_AMX
    f |= 2;
#endif
#ifdef INT4_HAVE_DP
    f |= 4;
#endif
    return f;
}

// canonical qweight int32 [N, K/8] -> qb uint8 [NB, K/2, 16] (see the top of this file). The
// canonical byte p of channel n holds k = 2p (low nibble) and 2p + 1 (high nibble).
int int4_pack_blocks(const int32_t* qweight, int64_t N, int64_t K, uint8_t* qb, int nthreads) {
    if (K % 8) return 1;
    const int64_t NB = (N + 15) / 16, P = K / 2;
    const uint8_t* src = reinterpret_cast<const uint8_t*>(qweight);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < NB; ++j)
        for (int64_t p = 0; p < P; p += 2)  // rows p, p + 1 share each destination byte
            for (int64_t c = 0; c < 16; ++c)
                for (int h = 0; h < 2; ++h) {
                    const int64_t n = j * 16 + c;
                    const int lo = n < N ? (src[n * P + p] >> (4 * h)) & 0x0f : 0;
                    const int hi = n < N ? (src[n * P + p + 1] >> (4 * h)) & 0x0f : 0;
                    qb[j * P * 16 + code_byte(p, c, h)] = uint8_t(lo | (hi << 4));
                }
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)

// Index vectors of the two-stage 8 x 16 -> 16 x 8 transpose of 16-bit values in
// int4_dequant: stage 1 puts k = 0..3 (or 4..7) of channels c0..c0+7 side by side, stage 2
// joins the two halves of 4 channels.
struct TransposeIdx {
    __m512i s1_lo, s1_hi, s2[2];
    TransposeIdx() {
        alignas(64) int16_t a[32], b[32], c[2][32];
        for (int e = 0; e < 32; ++e) {  // e = 4 c + i: k = i of channel c (c < 8)
            const int ch = e / 4, i = e % 4;
            a[e] = int16_t((i / 2) * 32 + (i % 2) * 16 + ch);
            b[e] = int16_t(a[e] + 8);
        }
        for (int h = 0; h < 2; ++h)
            for (int e = 0; e < 32; ++e) {  // e = 8 c + i: channel 4 h + c of the 8 in stage 1
                const int ch = 4 * h + e / 8, i = e % 8;
                c[h][e] = int16_t((i < 4 ? 0 : 32) + 4 * ch + i % 4);
            }
        s1_lo = _mm512_load_si512(a);
        s1_hi = _mm512_load_si512(b);
        s2[0] = _mm512_load_si512(c[0]);
        s2[1] = _mm512_load_si512(c[1]);
    }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// One chunk (k = 2p..2p+7 of a block's 16 channels) dequantized to bf16 and transposed:
// out[q] holds channels 4q..4q+3, 8 values of k each (one 128-bit lane per channel).
inline void chunk_transposed(const uint8_t* chunk, const float* s, const TransposeIdx& tix,
                             __m512i* out) {
    const __m512 vs = _mm512_loadu_ps(s);
    // (16 + q) s + b' = q s + b
    const __m512 vb = _mm512_fmadd_ps(_mm512_set1_ps(16.f), vs, _mm512_loadu_ps(s + 16));
    __m512i w[4], kk[4];
    chunk_pairs(chunk, w);
    for (int n = 0; n < 4; ++n) {  // kk[n] = [k = 2n: 16 channels | k = 2n + 1: 16 channels]
        __m512 lo, hi;
        pairs_dequant(w[n], vs, vb, lo, hi);
        kk[n] = _mm512_inserti64x4(_mm512_castsi256_si512(bf16_round(lo)), bf16_round(hi), 1);
    }
    const __m512i a_lo = _mm512_permutex2var_epi16(kk[0], tix.s1_lo, kk[1]);
    const __m512i a_hi = _mm512_permutex2var_epi16(kk[0], tix.s1_hi, kk[1]);
    const __m512i b_lo = _mm512_permutex2var_epi16(kk[2], tix.s1_lo, kk[3]);
    const __m512i b_hi = _mm512_permutex2var_epi16(kk[2], tix.s1_hi, kk[3]);
    out[0] = _mm512_permutex2var_epi16(a_lo, tix.s2[0], b_lo);
    out[1] = _mm512_permutex2var_epi16(a_lo, tix.s2[1], b_lo);
    out[2] = _mm512_permutex2var_epi16(a_hi, tix.s2[0], b_hi);
    out[3] = _mm512_permutex2var_epi16(a_hi, tix.s2[1], b_hi);
}
#endif

// w as a dense [N, K] matrix in out_dt (w = q * s + b in fp32, rounded once), for the
// large-M path that hands w^T to the BLAS GEMM (x @ w^T: the operand layout torch's bf16 GEMM
// is fastest on, 4-10 % over a [K, N] one on a 2-core EPYC). Each thread writes the K-long rows
// of whole blocks of 16 channels; bf16 with AVX-512 takes four chunks (k = 32 values) at a
// time, transposed in registers into one 64-byte run per channel.
int int4_dequant(const uint8_t* qb, const float* sb, int64_t N, int64_t K, int64_t group,
                 void* out, int out_dt, int nthreads) {
    if (group % 8 || K % group) return 1;
    const int64_t G = K / group, NB = (N + 15) / 16, P = K / 2;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const TransposeIdx tix;
#endif
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < NB; ++j) {
        const uint8_t* qj = qb + j * P * 16;
        const float* sbj = sb + j * G * 32;
        const int64_t n0 = j * 16, cols = std::min<int64_t>(16, N - n0);
        int64_t p = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if (cols == 16 && out_dt == BF16) {
            uint16_t* o = static_cast<uint16_t*>(out) + n0 * K;
            for (; p + 16 <= P; p += 16) {  // k = 2p..2p+31: one 64-byte run per channel
                __m512i v[4][4];
                for (int t = 0; t < 4; ++t)
                    chunk_transposed(qj + (p + 4 * t) * 16, sbj + (2 * (p + 4 * t) / group) * 32,
                                     tix, v[t]);
                for (int q = 0; q < 4; ++q) {  // lanes: [t][channel] -> [channel][t]
                    const __m512i u0 = _mm512_shuffle_i64x2(v[0][q], v[1][q], 0x44);
                    const __m512i u1 = _mm512_shuffle_i64x2(v[0][q], v[1][q], 0xee);
                    const __m512i u2 = _mm512_shuffle_i64x2(v[2][q], v[3][q], 0x44);
                    const __m512i u3 = _mm512_shuffle_i64x2(v[2][q], v[3][q], 0xee);
                    const __m512i r[4] = {_mm512_shuffle_i64x2(u0, u2, 0x88),
                                          _mm512_shuffle_i64x2(u0, u2, 0xdd),
                                          _mm512_shuffle_i64x2(u1, u3, 0x88),
                                          _mm512_shuffle_i64x2(u1, u3, 0xdd)};
                    for (int l = 0; l < 4; ++l)
                        _mm512_storeu_si512(o + (4 * q + l) * K + 2 * p, r[l]);
                }
            }
            for (; p < P; p += 4) {  // the K tail, one chunk (8 values per channel) at a time
                __m512i v[4];
                chunk_transposed(qj + p * 16, sbj + (2 * p / group) * 32, tix, v);
                for (int q = 0; q < 4; ++q) {
                    uint16_t* oq = o + 4 * q * K + 2 * p;
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(oq), _mm512_castsi512_si128(v[q]));
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(oq + K),
                                     _mm512_extracti32x4_epi32(v[q], 1));
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(oq + 2 * K),
                                     _mm512_extracti32x4_epi32(v[q], 2));
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(oq + 3 * K),
                                     _mm512_extracti32x4_epi32(v[q], 3));
                }
            }
        }
#endif
        for (; p < P; p += 4) {
            const float* s = sbj + (2 * p / group) * 32;
            for (int64_t c = 0; c < cols; ++c) {
                const float b = s[16 + c] + 16.f * s[c];
                for (int64_t pp = p; pp < p + 4; ++pp)
                    for (int h = 0; h < 2; ++h)
                        store_from_f32(out, (n0 + c) * K + 2 * pp + h,
                                       float(code_at(qj, pp, c, h)) * s[c] + b, out_dt);
            }
        }
    }
    return 0;
}

// use_amx: 1 lets bf16 x take the AMX path (the caller has asked the OS for the AMX state).
// dense_min_m: rows from which the AMX path multiplies dequantized bf16 tiles (no per-group
// scaling; 0 = never). dp_max_m: rows up to which bf16 x takes the VDPBF16PS path rather than
// AMX tiles (without AMX it takes every bf16 call); negative: never (the FMA path instead).
int int4_gemm(const void* x, int x_dt, int64_t M, int64_t K, const uint8_t* qb, const float* sb,
              int64_t N, int64_t group, void* y, int y_dt, int use_amx, int64_t dense_min_m,
              int64_t dp_max_m, int nthreads) {
    if (group % 8 || K % group) return 1;  // whole chunks (8 k) per group
    if (M == 0 || N == 0) return 0;
#ifdef INT4_HAVE_AMX
    if (use_amx && x_dt == BF16 && group % 32 == 0 && dense_min_m > 0 && M >= dense_min_m) {
        gemm_amx_dense(static_cast<const uint16_t*>(x), M, K, qb, sb, N, group, y, y_dt,
                       nthreads);
        return 0;
    }
    if (x_dt == BF16 && group % 16 == 0 && M <= dp_max_m) {
        gemm_dp(static_cast<const uint16_t*>(x), M, K, qb, sb, N, group, y, y_dt, nthreads);
        return 0;
    }
    if (use_amx && x_dt == BF16 && group % 32 == 0) {
        gemm_amx(static_cast<const uint16_t*>(x), M, K, qb, sb, N, group, y, y_dt, nthreads);
        return 0;
    }
#endif
#ifdef INT4_HAVE_DP
    if (x_dt == BF16 && group % 16 == 0 && dp_max_m >= 0) {  // every M AMX did not take
        gemm_dp(static_cast<const uint16_t*>(x), M, K, qb, sb, N, group, y, y_dt, nthreads);
        return 0;
    }
#endif
    (void)use_amx;
    (void)dense_min_m;
    (void)dp_max_m;
    gemm_fma(x, x_dt, M, K, qb, sb, N, group, y, y_dt, nthreads);
    return 0;
}

}  // extern "C"
