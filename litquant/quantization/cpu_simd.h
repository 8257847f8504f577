// cpu_simd.h: what every litquant CPU kernel shares: a few vector operations that let one kernel body serve
// AVX-512, AVX2 and plain C; fp16/bf16 conversions; the thread count for a problem size. Included by cpu_kernels.c.
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// ---- a few vector operations, so that one kernel body serves AVX-512, AVX2 and plain C ----------------------
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define V 16
typedef __m512 vf;
typedef __m512i vi;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vi vloadi(const int32_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline vf vbits(vi w, int sh, int mask) {  // ((w >> sh) & mask) as floats
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, sh), _mm512_set1_epi32(mask)));
}
static inline vf vhalf(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vi vbytes(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vf vzeros(const int32_t *qz, int64_t n, int bits, int lp) {  // GPTQ zero points of columns n..n+V-1
    // element e = (n mod values-per-word) + lane, counted from the word holding n
    const __m512i e = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                       _mm512_set1_epi32((int)(n & ((1 << lp) - 1))));
    const int nw = ((int)(n & ((1 << lp) - 1)) + V + (1 << lp) - 1) >> lp;
    const __m512i words = _mm512_maskz_loadu_epi32((__mmask16)((1u << nw) - 1), qz + (n >> lp));
    const __m512i sh = _mm512_mullo_epi32(_mm512_and_si512(e, _mm512_set1_epi32((1 << lp) - 1)), _mm512_set1_epi32(bits));
    const __m512i z = _mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_srli_epi32(e, lp), words), sh);
    return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_and_si512(z, _mm512_set1_epi32((1 << bits) - 1)), _mm512_set1_epi32(1)));
}
static inline vf vbf16(const uint16_t *p) {  // bf16 -> fp32 is a shift
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
typedef __m512 vlut;
static inline vlut lut_load(const float *t) { return _mm512_loadu_ps(t); }
static inline vf lut_get(vlut t, vi idx) { return _mm512_permutexvar_ps(idx, t); }  // low 4 bits of idx
#elif defined(__AVX2__) && defined(__FMA__)
#define V 8
typedef __m256 vf;
typedef __m256i vi;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
static inline vi vloadi(const int32_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vf vbits(vi w, int sh, int mask) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, sh), _mm256_set1_epi32(mask)));
}
static inline vf vhalf(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vi vbytes(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vf vzeros(const int32_t *qz, int64_t n, int bits, int lp) {
    const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i e = _mm256_add_epi32(lane, _mm256_set1_epi32((int)(n & ((1 << lp) - 1))));
    const int nw = ((int)(n & ((1 << lp) - 1)) + V + (1 << lp) - 1) >> lp;
    const __m256i words = _mm256_maskload_epi32(qz + (n >> lp), _mm256_cmpgt_epi32(_mm256_set1_epi32(nw), lane));
    const __m256i sh = _mm256_mullo_epi32(_mm256_and_si256(e, _mm256_set1_epi32((1 << lp) - 1)), _mm256_set1_epi32(bits));
    const __m256i z = _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(words, _mm256_srli_epi32(e, lp)), sh);
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_and_si256(z, _mm256_set1_epi32((1 << bits) - 1)), _mm256_set1_epi32(1)));
}
static inline vf vbf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
typedef struct { __m256 lo, hi; } vlut;
static inline vlut lut_load(const float *t) { vlut r = {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; return r; }
static inline vf lut_get(vlut t, vi idx) {  // 16-entry table: bit 3 of idx picks the half
    __m256 a = _mm256_permutevar8x32_ps(t.lo, idx), b = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#else
#define V 1
typedef float vf;
typedef int32_t vi;
static inline vf vzero(void) { return 0.0f; }
static inline vf vset1(float a) { return a; }
static inline vf vload(const float *p) { return *p; }
static inline void vstore(float *p, vf a) { *p = a; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline float vsum(vf a) { return a; }
static inline vi vloadi(const int32_t *p) { return *p; }
static inline vf vbits(vi w, int sh, int mask) { return (float)(((uint32_t)w >> sh) & (uint32_t)mask); }
static float f16_to_f32(uint16_t h);
static inline vf vhalf(const uint16_t *p) { return f16_to_f32(*p); }
static inline vi vbytes(const uint8_t *p) { return *p; }
static inline vf vzeros(const int32_t *qz, int64_t n, int bits, int lp) {
    return (float)((((uint32_t)qz[n >> lp]) >> (bits * (n & ((1 << lp) - 1)))) & ((1u << bits) - 1)) + 1.0f;
}
static inline vf vbf16(const uint16_t *p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
typedef const float *vlut;
static inline vlut lut_load(const float *t) { return t; }
static inline vf lut_get(vlut t, vi idx) { return t[idx & 15]; }
#endif

// RUN(1), RUN(2), RUN(3) or RUN(4) for mb rows: with a constant row count the loops over rows unroll and their
// accumulators stay in registers
#define BY_ROWS(mb, RUN)                    \
    do {                                    \
        switch (mb) {                       \
            case 1: RUN(1); break;          \
            case 2: RUN(2); break;          \
            case 3: RUN(3); break;          \
            default: RUN(4);                \
        }                                   \
    } while (0)

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even (weights are finite)
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0 && man == 0) {
        u = sign;
    } else if (exp == 0) {  // subnormal
        exp = 127 - 15 + 1;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3FF) << 13);
    } else if (exp == 31) {
        u = sign | 0x7F800000 | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void store_row(void *out, int64_t i, int64_t K, const float *v, int bf16) {
    if (bf16) {
        uint16_t *o = (uint16_t *)out + i * K;
        for (int64_t k = 0; k < K; k++) o[k] = f32_to_bf16(v[k]);
    } else {
        memcpy((float *)out + i * K, v, K * sizeof(float));
    }
}

static inline int nthreads_for(int64_t work, int nthreads) {  // small problems: one thread (no fork/join)
    return work < (1 << 16) ? 1 : nthreads;
}
