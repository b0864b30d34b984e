// int4 weight-only GEMM on the CPU, straight from the canonical layout (no repacking).
//
// Weight: qweight int32 [N, K/8], code of (n, k) = nibble k%8 of word k/8 (0..15), so one row's
// codes are contiguous and little-endian bytes hold codes (2j, 2j+1) in (low, high) nibbles.
// sb float32 [N, G, 2]: per output channel n and group g, (scale s, offset b) with
// w[n, k] = q[n, k] * s + b  (b = -zp*s for integer zero points, z - 8 s for float ones).
//
// Two entry points, both C ABI (loaded with ctypes; no torch headers, so the build takes ~2 s):
//   int4_gemm:    y[M, N] = x[M, K] @ w^T, fp32 accumulation, for small M. Per output channel
//                 and group: sum_k q*x on the codes (converted to fp32 in registers), then
//                 y += s * that + b * sum_k x (the group sums of x are taken once per call).
//   int4_dequant: rows [n0, n1) of w as bf16/fp16/fp32 (q*s + b in fp32, rounded once), for the
//                 large-M path that multiplies cache-sized tiles with the BLAS GEMM.
// Threads: OpenMP, nthreads given by the caller (torch's own count; the library links the same
// libgomp that torch loaded, so the pool and its core binding are shared).

#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>
#ifdef __AVX512F__
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

constexpr int MB = 4;  // activation rows per pass over a weight row

#ifdef __AVX512F__
// 16 codes k..k+15 of a row (8 bytes) as fp32, in k order.
inline __m512 codes16(const uint8_t* p) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(b, m);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}

// Rows [m0, m0 + R) of y for output channel n (R <= MB). xf: fp32 x [M, K]; xs: group sums
// [M, G]. K % 16 == 0 and group % 16 == 0 (checked by the caller).
template <int R>
inline void gemm_row(const float* xf, const float* xs, const uint8_t* qrow, const float* sb,
                     int64_t K, int64_t G, int64_t group, int64_t m0, float* out) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    float boff[R] = {};
    for (int64_t g = 0; g < G; ++g) {
        __m512 accg[R];
        for (int r = 0; r < R; ++r) accg[r] = _mm512_setzero_ps();
        const int64_t k0 = g * group, k1 = k0 + group;
        for (int64_t k = k0; k < k1; k += 16) {
            const __m512 q = codes16(qrow + k / 2);
            for (int r = 0; r < R; ++r)
                accg[r] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xf + (m0 + r) * K + k), accg[r]);
        }
        const __m512 s = _mm512_set1_ps(sb[2 * g]);
        const float b = sb[2 * g + 1];
        for (int r = 0; r < R; ++r) {
            acc[r] = _mm512_fmadd_ps(accg[r], s, acc[r]);
            boff[r] += b * xs[(m0 + r) * G + g];
        }
    }
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + boff[r];
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// bf16 activations: codes become bf16 (16 + q) in place of q, exactly (16..31 step 1/8 is
// representable), and VDPBF16PS multiplies 32 of them with 32 bf16 x per instruction into 16
// fp32 lanes (exact products). sum (16 + q) x = sum q x + 16 sum x: the caller's offset is
// b - 16 s. Byte j of a row holds codes (2j, 2j+1), which is the pair order VDPBF16PS wants.
inline __m512bh codes32_bf16(const uint8_t* p) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i both = _mm512_or_si512(_mm512_slli_epi32(d, 3), _mm512_slli_epi32(d, 15));
    // (both & 0x00780078) | 0x41804180: low code in bits 3..6, high code in bits 19..22
    return (__m512bh)_mm512_ternarylogic_epi32(both, _mm512_set1_epi32(0x00780078),
                                               _mm512_set1_epi32(0x41804180), 0xEA);
}

// Output channels n and n + 1 (two independent chains), rows m0..m0+R. xb: bf16 x [M, K].
template <int R, int C>
inline void gemm_rows_bf16(const uint16_t* xb, const float* xs, const uint8_t* q0,
                           const float* sb0, int64_t K, int64_t G, int64_t group, int64_t m0,
                           float* out /* [C][R] */) {
    __m512 acc[C][R];
    float boff[C][R] = {};
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m512 accg[C][R];
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r) accg[c][r] = _mm512_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m512bh w[C];
            for (int c = 0; c < C; ++c) w[c] = codes32_bf16(q0 + c * (K / 2) + k / 2);
            for (int r = 0; r < R; ++r) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (m0 + r) * K + k);
                for (int c = 0; c < C; ++c) accg[c][r] = _mm512_dpbf16_ps(accg[c][r], w[c], xv);
            }
        }
        for (int c = 0; c < C; ++c) {
            const float s = sb0[c * G * 2 + 2 * g], b = sb0[c * G * 2 + 2 * g + 1] - 16.0f * s;
            const __m512 vs = _mm512_set1_ps(s);
            for (int r = 0; r < R; ++r) {
                acc[c][r] = _mm512_fmadd_ps(accg[c][r], vs, acc[c][r]);
                boff[c][r] += b * xs[(m0 + r) * G + g];
            }
        }
    }
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) out[c * R + r] = _mm512_reduce_add_ps(acc[c][r]) + boff[c][r];
}

template <int R>
inline void gemm_pair_bf16(const uint16_t* xb, const float* xs, const uint8_t* qb,
                           const float* sb, int64_t K, int64_t G, int64_t group, int64_t n,
                           int64_t N, int64_t m0, void* y, int y_dt) {
    float out[2 * R];
    const uint8_t* q0 = qb + n * (K / 2);
    const float* sb0 = sb + n * G * 2;
    if (n + 1 < N) {
        gemm_rows_bf16<R, 2>(xb, xs, q0, sb0, K, G, group, m0, out);
        for (int r = 0; r < R; ++r) {
            store_from_f32(y, (m0 + r) * N + n, out[r], y_dt);
            store_from_f32(y, (m0 + r) * N + n + 1, out[R + r], y_dt);
        }
    } else {
        gemm_rows_bf16<R, 1>(xb, xs, q0, sb0, K, G, group, m0, out);
        for (int r = 0; r < R; ++r) store_from_f32(y, (m0 + r) * N + n, out[r], y_dt);
    }
}
#define INT4_HAVE_BF16_DP 1
#endif

// Portable version of gemm_row (no AVX-512): same arithmetic, scalar.
inline void gemm_row_scalar(const float* xf, const float* xs, const uint8_t* qrow,
                            const float* sb, int64_t K, int64_t G, int64_t group, int64_t m0,
                            int R, float* out) {
    for (int r = 0; r < R; ++r) {
        const float* xr = xf + (m0 + r) * K;
        float acc = 0.f;
        for (int64_t g = 0; g < G; ++g) {
            float accg = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
                const uint8_t byte = qrow[k / 2];
                accg += float(byte & 0x0f) * xr[k] + float(byte >> 4) * xr[k + 1];
            }
            acc += sb[2 * g] * accg + sb[2 * g + 1] * xs[(m0 + r) * G + g];
        }
        out[r] = acc;
    }
}

}  // namespace

extern "C" {

// 1 when this build vectorizes with AVX-512 (else the portable loops).
int int4_cpu_has_avx512() {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

int int4_gemm(const void* x, int x_dt, int64_t M, int64_t K, const int32_t* qweight,
              const float* sb, int64_t N, int64_t group, void* y, int y_dt, int nthreads) {
    if (K % 16 || group % 16 || K % group) return 1;
    const int64_t G = K / group;
    std::vector<float> xf(size_t(M * K)), xs(size_t(M * G));
    for (int64_t i = 0; i < M * K; ++i) xf[i] = load_as_f32(x, i, x_dt);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) {
            float s = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xf[m * K + k];
            xs[m * G + g] = s;
        }
    const uint8_t* qb = reinterpret_cast<const uint8_t*>(qweight);
#ifdef INT4_HAVE_BF16_DP
    if (x_dt == BF16 && group % 32 == 0) {
        const uint16_t* xb = static_cast<const uint16_t*>(x);
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t n = 0; n < N; n += 2) {
            for (int64_t m0 = 0; m0 < M; m0 += MB) {
                switch (std::min<int64_t>(MB, M - m0)) {
                    case 4: gemm_pair_bf16<4>(xb, xs.data(), qb, sb, K, G, group, n, N, m0, y, y_dt); break;
                    case 3: gemm_pair_bf16<3>(xb, xs.data(), qb, sb, K, G, group, n, N, m0, y, y_dt); break;
                    case 2: gemm_pair_bf16<2>(xb, xs.data(), qb, sb, K, G, group, n, N, m0, y, y_dt); break;
                    default: gemm_pair_bf16<1>(xb, xs.data(), qb, sb, K, G, group, n, N, m0, y, y_dt);
                }
            }
        }
        return 0;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* qrow = qb + n * (K / 2);
        const float* sbn = sb + n * G * 2;
        float out[MB];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int R = int(std::min<int64_t>(MB, M - m0));
#ifdef __AVX512F__
            switch (R) {
                case 4: gemm_row<4>(xf.data(), xs.data(), qrow, sbn, K, G, group, m0, out); break;
                case 3: gemm_row<3>(xf.data(), xs.data(), qrow, sbn, K, G, group, m0, out); break;
                case 2: gemm_row<2>(xf.data(), xs.data(), qrow, sbn, K, G, group, m0, out); break;
                default: gemm_row<1>(xf.data(), xs.data(), qrow, sbn, K, G, group, m0, out);
            }
#else
            gemm_row_scalar(xf.data(), xs.data(), qrow, sbn, K, G, group, m0, R, out);
#endif
            for (int r = 0; r < R; ++r) store_from_f32(y, (m0 + r) * N + n, out[r], y_dt);
        }
    }
    return 0;
}

int int4_dequant(const int32_t* qweight, const float* sb, int64_t n0, int64_t n1, int64_t K,
                 int64_t group, void* out, int out_dt, int nthreads) {
    if (K % 2 || K % group) return 1;
    const int64_t G = K / group;
    const uint8_t* qb = reinterpret_cast<const uint8_t*>(qweight);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* qrow = qb + n * (K / 2);
        const float* sbn = sb + n * G * 2;
        const int64_t o = (n - n0) * K;
        for (int64_t g = 0; g < G; ++g) {
            const float s = sbn[2 * g], b = sbn[2 * g + 1];
            int64_t k = g * group;
            const int64_t k1 = k + group;
#ifdef INT4_HAVE_BF16_DP
            if (out_dt == BF16 && group % 32 == 0) {
                // the group's 16 possible weights q * s + b as bf16 (one rounding), then one
                // VPERMW per 32 codes: dword j = code 2j | code 2j+1 << 16 indexes the table
                const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                   13, 14, 15);
                const __m256bh lut16 = _mm512_cvtneps_pbh(
                    _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(b)));
                const __m512i lut = _mm512_castsi256_si512((__m256i)lut16);
                for (; k < k1; k += 32) {
                    const __m512i d = _mm512_cvtepu8_epi32(
                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + k / 2)));
                    const __m512i idx = _mm512_ternarylogic_epi32(
                        d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
                    _mm512_storeu_si512(static_cast<uint16_t*>(out) + o + k,
                                        _mm512_permutexvar_epi16(idx, lut));
                }
                continue;
            }
#endif
#ifdef __AVX512F__
            if (out_dt == BF16 && group % 16 == 0) {
                const __m512 vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b);
                for (; k < k1; k += 16) {
                    const __m512 w = _mm512_fmadd_ps(codes16(qrow + k / 2), vs, vb);
                    // round to nearest even (w is finite: codes, finite scales)
                    __m512i u = _mm512_castps_si512(w);
                    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                         _mm512_set1_epi32(1));
                    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
                    _mm256_storeu_si256(
                        reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + o + k),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
                }
                continue;
            }
#endif
            for (; k < k1; k += 2) {
                const uint8_t byte = qrow[k / 2];
                store_from_f32(out, o + k, float(byte & 0x0f) * s + b, out_dt);
                store_from_f32(out, o + k + 1, float(byte >> 4) * s + b, out_dt);
            }
        }
    }
    return 0;
}

}  // extern "C"
