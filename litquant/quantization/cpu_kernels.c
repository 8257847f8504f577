// litquant's CPU kernels for quantized Linears: small-M matmul straight from the stored layouts, and row-range
// dequantization for everything wider. Plain C (no torch headers), built on first use by cpu_kernels.py with
// `cc -O3 -march=native -fopenmp` and called through ctypes; OpenMP resolves to the libgomp torch has loaded, so
// the kernels share torch's thread pool. Activations and outputs are fp32; the weights are read as stored.
//
// Layouts (see bnb_linear.py and gptq_format.py):
//   bnb 4-bit  codes of the (N, K) weight row-major, two per byte, first in the high nibble; one absmax per 64
//              elements (fp32, or uint8 codes into `ncode` times `nabsmax` per 256 blocks, plus `offset`: one
//              for the layer (ostride 0) or one per 256 blocks (ostride 1, q/k/v fused from separate layers)).
//   int8       (N, K) int8 row-major (LLM.int8 storage).
//   GPTQ       qweight int32 (K*bits/32, N) packed along K, lowest bits first; qzeros int32 (G, N*bits/32) packed
//              along N, stored as zero-1; scales fp16 (G, N); g_idx int32 (K,). W[n,k] = s[g,n]*(q - z[g,n]).
#include "cpu_simd.h"

#define BNB_BLOCK 64
#define BNB_NESTED 256

int lq_version(void) { return 9; }
int lq_lanes(void) { return V; }
int lq_vnni(void) {  // int8 dot-product instructions: torch's int8 matmul is fast for many rows
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    return 1;
#else
    return 0;
#endif
}

// ---- bitsandbytes 4-bit ----------------------------------------------------------------------------------------
// y[M, N] = x[M, K] @ W^T: output n is a dot product along K/2 contiguous bytes. K % (2V) == 0 and K % 64 == 0
// (the caller checks). x is first reordered per chunk of 2V elements: the V even ones, then the V odd ones, so the
// high nibbles of V consecutive bytes meet the even elements and the low nibbles the odd ones, without shuffles.

static inline void bnb_absmax(float *out, int64_t b0, int64_t nb, const float *absmax, const uint8_t *qabsmax,
                              const float *ncode, const float *nabsmax, const float *offset, int64_t ostride) {
    if (qabsmax == NULL) {
        memcpy(out, absmax + b0, nb * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < nb; i++) {  // double quantization undone as bnb does it
        int64_t b = b0 + i;
        out[i] = ncode[qabsmax[b]] * nabsmax[b / BNB_NESTED] + offset[b / BNB_NESTED * ostride];
    }
}

// `am`: the row's fp32 absmax; or with double quantization (DQ, a constant) its uint8 codes `qam`, undone as each
// block is reached (scalar work that overlaps the vector loop, where a separate pass over the row's blocks costs ~20%)
static inline __attribute__((always_inline)) void bnb4_row(const uint8_t *row, const float *am, const uint8_t *qam,
                                                           const float *ncode, const float *nabsmax,
                                                           const float *offset, int64_t ostride, int64_t b0, const int DQ, int64_t K, const float *xr,
                                                           int mb, vlut lut, float *out) {
    vf acc[4][2];
    for (int m = 0; m < 4; m++) acc[m][0] = acc[m][1] = vzero();
    float s = 0.0f;
    for (int64_t k = 0; k < K; k += 2 * V) {
        if (!DQ) {
            s = am[k / BNB_BLOCK];
        } else if (k % BNB_BLOCK == 0) {
            const int64_t b = b0 + k / BNB_BLOCK;
            s = ncode[qam[b]] * nabsmax[b / BNB_NESTED] + offset[b / BNB_NESTED * ostride];
        }
        const vf a = vset1(s);
        vi codes = vbytes(row + k / 2);
#if V == 1
        vi hi = codes >> 4;
#elif V == 8
        vi hi = _mm256_srli_epi32(codes, 4);
        codes = _mm256_and_si256(codes, _mm256_set1_epi32(15));
#else
        vi hi = _mm512_srli_epi32(codes, 4);
#endif
        const vf we = vmul(lut_get(lut, hi), a), wo = vmul(lut_get(lut, codes), a);
        for (int m = 0; m < mb; m++) {
            const float *xm = xr + m * K + k;
            acc[m][0] = vfma(we, vload(xm), acc[m][0]);
            acc[m][1] = vfma(wo, vload(xm + V), acc[m][1]);
        }
    }
    for (int m = 0; m < mb; m++) out[m] = vsum(acc[m][0]) + vsum(acc[m][1]);
}

void lq_bnb4_gemm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *absmax,
                  const uint8_t *qabsmax, const float *ncode, const float *nabsmax, const float *offset,
                  int64_t ostride, const float *lut, float *y, float *xr /* M * K scratch */, int nthreads) {
    const int64_t bpr = K / BNB_BLOCK;  // blocks per row
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 2 * V)
            for (int i = 0; i < V; i++) {
                xr[m * K + c + i] = x[m * K + c + 2 * i];
                xr[m * K + c + V + i] = x[m * K + c + 2 * i + 1];
            }
#pragma omp parallel num_threads(nthreads_for(N * K * M, nthreads))
    {
        const vlut t = lut_load(lut);
        float out[4];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = w + n * (K / 2);
            const float *am = qabsmax ? NULL : absmax + n * bpr;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                int mb = (int)(M - m0 < 4 ? M - m0 : 4);
                const float *xm = xr + m0 * K;
#define DQ_ROW(MB) bnb4_row(row, am, qabsmax, ncode, nabsmax, offset, ostride, n * bpr, 1, K, xm, MB, t, out)
#define ROW(MB) bnb4_row(row, am, NULL, NULL, NULL, NULL, 0, n * bpr, 0, K, xm, MB, t, out)
                if (qabsmax)  // DQ a constant too: no branch on it inside the row
                    BY_ROWS(mb, DQ_ROW);
                else
                    BY_ROWS(mb, ROW);
#undef DQ_ROW
#undef ROW
                for (int m = 0; m < mb; m++) y[(m0 + m) * N + n] = out[m];
            }
        }
    }
}

// one row of W in fp32, in order (lut value * absmax, the product bnb's dequantize computes)
static inline void bnb4_decode_row(const uint8_t *row, const float *am, int64_t K, vlut t, float *v) {
    for (int64_t k = 0; k < K; k += 2 * V) {
        const vf a = vset1(am[k / BNB_BLOCK]);
        vi codes = vbytes(row + k / 2);
#if V == 16
        const vf we = vmul(lut_get(t, _mm512_srli_epi32(codes, 4)), a), wo = vmul(lut_get(t, codes), a);
        const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        _mm512_storeu_ps(v + k, _mm512_permutex2var_ps(we, lo, wo));
        _mm512_storeu_ps(v + k + 16, _mm512_permutex2var_ps(we, hi, wo));
#elif V == 8
        const vf we = vmul(lut_get(t, _mm256_srli_epi32(codes, 4)), a);
        const vf wo = vmul(lut_get(t, _mm256_and_si256(codes, _mm256_set1_epi32(15))), a);
        const __m256 l = _mm256_unpacklo_ps(we, wo), h = _mm256_unpackhi_ps(we, wo);  // per 128-bit lane
        _mm256_storeu_ps(v + k, _mm256_permute2f128_ps(l, h, 0x20));
        _mm256_storeu_ps(v + k + 8, _mm256_permute2f128_ps(l, h, 0x31));
#else
        v[k] = lut_get(t, codes >> 4) * am[k / BNB_BLOCK];
        v[k + 1] = lut_get(t, codes) * am[k / BNB_BLOCK];
#endif
    }
}

// rows [n0, n1) of the dequantized weight into out (fp32, or bf16 if out_bf16): code value * absmax in fp32, as bnb
void lq_bnb4_dequant(const uint8_t *w, int64_t N, int64_t K, const float *absmax, const uint8_t *qabsmax,
                     const float *ncode, const float *nabsmax, const float *offset, int64_t ostride, const float *lut,
                     int64_t n0, int64_t n1,
                     void *out, int out_bf16, int nthreads) {
    const int64_t bpr = K / BNB_BLOCK;
    (void)N;
#pragma omp parallel num_threads(nthreads_for((n1 - n0) * K, nthreads))
    {
        float *am = malloc(bpr * sizeof(float)), *v = malloc(K * sizeof(float));
        const vlut t = lut_load(lut);
#pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            bnb_absmax(am, n * bpr, bpr, absmax, qabsmax, ncode, nabsmax, offset, ostride);
            bnb4_decode_row(w + n * (K / 2), am, K, t, v);
            store_row(out, n - n0, K, v, out_bf16);
        }
        free(am);
        free(v);
    }
}

// ---- int8: LLM.int8 ---------------------------------------------------------------------------------------------
// y[M, N] = LLM.int8(x[M, K], W): input columns holding any |x| >= threshold multiply in fp32 with the dequantized
// weight; every other column is quantized per row of x to int8 (absmax of the row's remaining values) and multiplied
// exactly in int32 with the int8 weight, then rescaled by both absmaxes / 127^2 (the arithmetic of bnb.py's torch
// path, step for step). work: M * K int8 + K int32 + M floats.

// acc[m] = dot(xw[m], row) for mb rows of x widened to int16: each widened chunk of the weight row serves all mb
static inline __attribute__((always_inline)) void dot_i8_rows(const int16_t *xw, const int8_t *row, int64_t K,
                                                              int mb, int32_t *acc) {
    int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (; k + 32 <= K; k += 32) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k)));
        for (int m = 0; m < mb; m++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xw + m * K + k));
#ifdef __AVX512VNNI__
            a[m] = _mm512_dpwssd_epi32(a[m], wv, xv);
#else
            a[m] = _mm512_add_epi32(a[m], _mm512_madd_epi16(wv, xv));
#endif
        }
    }
    for (int m = 0; m < mb; m++) acc[m] = _mm512_reduce_add_epi32(a[m]);
#elif defined(__AVX2__)
    __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (; k + 16 <= K; k += 16) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
        for (int m = 0; m < mb; m++)
            a[m] = _mm256_add_epi32(a[m], _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i *)(xw + m * K + k))));
    }
    for (int m = 0; m < mb; m++) {
        int32_t part[8];
        _mm256_storeu_si256((__m256i *)part, a[m]);
        acc[m] = part[0] + part[1] + part[2] + part[3] + part[4] + part[5] + part[6] + part[7];
    }
#else
    for (int m = 0; m < mb; m++) acc[m] = 0;
#endif
    for (; k < K; k++)
        for (int m = 0; m < mb; m++) acc[m] += (int32_t)row[k] * xw[m * K + k];
}

// work: lq_int8_work(M, K, G) bytes (G = M / group outlier groups)
int64_t lq_int8_work(int64_t M, int64_t K, int64_t G) { return ((M * K * 2 + 63) / 64) * 64 + G * K * 4 + G * 4 + M * 4; }

// LLM.int8 with the outlier columns found per group of `group` consecutive rows (one sequence's tokens): a
// sequence's result does not depend on what else is in the batch.
void lq_int8_gemm(const float *x, int64_t M, int64_t K, const int8_t *w, const float *absmax, int64_t N,
                  float threshold, int64_t group, float *y, void *work, int nthreads) {
    const int64_t G = M / group;
    int16_t *xw = (int16_t *)work;
    int32_t *outl = (int32_t *)((char *)work + ((M * K * 2 + 63) / 64) * 64);  // G lists of up to K columns
    int32_t *nout = outl + G * K;
    float *xabs = (float *)(nout + G);
    for (int64_t g = 0; g < G; g++) {
        int32_t n = 0;
        for (int64_t k = 0; k < K; k++) {
            int is_out = 0;
            for (int64_t m = g * group; m < (g + 1) * group && threshold > 0; m++)
                is_out |= __builtin_fabsf(x[m * K + k]) >= threshold;
            if (is_out) outl[g * K + n++] = (int32_t)k;
        }
        nout[g] = n;
    }
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int16_t *qm = xw + m * K;
        const int32_t *ol = outl + (m / group) * K;
        const int64_t n_out = nout[m / group];
        float a = 0.0f;
        int64_t o = 0;
        for (int64_t k = 0; k < K; k++) {
            if (o < n_out && ol[o] == k) { o++; continue; }
            const float v = __builtin_fabsf(xm[k]);
            a = v > a ? v : a;
        }
        xabs[m] = a;
        const float scale = a > 0 ? 127.0f / a : 0.0f;
        o = 0;
        for (int64_t k = 0; k < K; k++) {
            if (o < n_out && ol[o] == k) { qm[k] = 0; o++; continue; }
            qm[k] = (int16_t)(int8_t)__builtin_nearbyintf(xm[k] * scale);  // round half to even, as torch.round
        }
    }
#pragma omp parallel for schedule(static) num_threads(nthreads_for(N * K * M, nthreads))
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = w + n * K;
        const float wd = absmax[n] / 127.0f;
        int32_t acc[4];
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mb = (int)(M - m0 < 4 ? M - m0 : 4);
#define RUN(MB) dot_i8_rows(xw + m0 * K, row, K, MB, acc)
            BY_ROWS(mb, RUN);
#undef RUN
            for (int m = 0; m < mb; m++) {
                float v = (float)acc[m] * (xabs[m0 + m] * absmax[n] / 16129.0f);
                const int32_t *ol = outl + ((m0 + m) / group) * K;
                const int64_t n_out = nout[(m0 + m) / group];
                if (n_out) {
                    float extra = 0.0f;
                    for (int64_t o = 0; o < n_out; o++) extra += x[(m0 + m) * K + ol[o]] * ((float)row[ol[o]] * wd);
                    v += extra;
                }
                y[(m0 + m) * N + n] = v;
            }
        }
    }
}

// rows [n0, n1) of W = w * (absmax / 127), the product in fp32 as bnb.py's dequantize does it
void lq_int8_dequant(const int8_t *w, int64_t N, int64_t K, const float *absmax, int64_t n0, int64_t n1, void *out,
                     int out_bf16, int nthreads) {
    (void)N;
#pragma omp parallel num_threads(nthreads_for((n1 - n0) * K, nthreads))
    {
        float *v = malloc(K * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            const float s = absmax[n] / 127.0f;
            for (int64_t k = 0; k < K; k++) v[k] = (float)w[n * K + k] * s;
            store_row(out, n - n0, K, v, out_bf16);
        }
        free(v);
    }
}

// ---- GPTQ (AutoGPTQ layout, bits 2, 4 or 8) -------------------------------------------------------------------
// Vectorised across output columns; each thread owns a contiguous range of columns and streams qweight row by row
// (a row of its range is contiguous, so the reads are sequential). Groups are visited one at a time:
// acc[n] = sum over k in group g of q[k, n] * x[k], then y[n] += s[g, n] * (acc[n] - z[g, n] * sum_{k in g} x[k]).
// `order` lists the input channels group by group (act-order checkpoints); NULL means g_idx[k] = k / group_size,
// so each packed word lies within one group and is loaded once.

#define GPTQ_MB 4

static inline int gptq_lp(int bits) { return bits == 2 ? 4 : bits == 4 ? 3 : 2; }  // log2 of values per int32

static inline int gptq_zero(const int32_t *qzeros, int64_t g, int64_t n, int64_t zcols, int bits) {
    const int lp = gptq_lp(bits);
    return (int)(((uint32_t)qzeros[g * zcols + (n >> lp)] >> (bits * (n & ((1 << lp) - 1)))) & ((1u << bits) - 1)) + 1;
}

// g_idx[k] = k / group_size: each group is a run of whole rows of qweight; acc holds one group at a time
static inline __attribute__((always_inline)) void gptq_ordered(
    const float *x, int mb, int64_t K, const int32_t *qw, int64_t N, int64_t g0, int64_t g1, const int32_t *qzeros,
    const uint16_t *scales, int64_t group_size, int64_t G, int bits, const float *xsum, float *acc /* mb * N */,
    float *y /* mb * N, accumulated into */) {
    const int lp = gptq_lp(bits), per = 1 << lp, mask = (1 << bits) - 1;
    const int64_t zcols = (N * bits + 31) / 32;
    for (int64_t g = g0; g < g1; g++) {
        memset(acc, 0, mb * N * sizeof(float));
        const int64_t r1 = ((g + 1) * group_size < K ? (g + 1) * group_size : K) >> lp;
        for (int64_t r = (g * group_size) >> lp; r < r1; r++) {
            const int32_t *wrow = qw + r * N;
            const float *xr = x + (r << lp);
            for (int64_t c = 0; c < N; c += V) {
                const vi w = vloadi(wrow + c);
                vf a[GPTQ_MB];
                for (int m = 0; m < mb; m++) a[m] = vload(acc + m * N + c);
                for (int j = 0; j < per; j++) {
                    const vf q = vbits(w, bits * j, mask);
                    for (int m = 0; m < mb; m++) a[m] = vfma(q, vset1(xr[m * K + j]), a[m]);
                }
                for (int m = 0; m < mb; m++) vstore(acc + m * N + c, a[m]);
            }
        }
        for (int64_t c = 0; c < N; c += V) {
            const vf s = vhalf(scales + g * N + c), z = vzeros(qzeros + g * zcols, c, bits, lp);
            for (int m = 0; m < mb; m++) {
                const vf d = vsub(vload(acc + m * N + c), vmul(z, vset1(xsum[m * G + g])));
                vstore(y + m * N + c, vfma(s, d, vload(y + m * N + c)));
            }
        }
    }
}

// any g_idx (act-order): rows [r0, r1) of qweight, each input channel into its group's accumulator
static inline __attribute__((always_inline)) void gptq_any_order(
    const float *x, int mb, int64_t K, const int32_t *qw, int64_t N, int64_t r0, int64_t r1, const int32_t *g_idx,
    int64_t G, int bits, float *acc /* mb * G * N, accumulated into */) {
    const int lp = gptq_lp(bits), per = 1 << lp, mask = (1 << bits) - 1;
    for (int64_t r = r0; r < r1; r++) {
        const int32_t *wrow = qw + r * N;
        for (int j = 0; j < per; j++) {
            const int64_t k = (r << lp) + j;
            float *ag = acc + g_idx[k] * N;
            vf xb[GPTQ_MB];
            for (int m = 0; m < mb; m++) xb[m] = vset1(x[m * K + k]);
            for (int64_t c = 0; c < N; c += V) {
                const vf q = vbits(vloadi(wrow + c), bits * j, mask);
                for (int m = 0; m < mb; m++) vstore(ag + m * G * N + c, vfma(q, xb[m], vload(ag + m * G * N + c)));
            }
        }
    }
}

int64_t lq_gptq_work(int64_t M, int64_t N, int64_t G, int ordered, int nthreads) {  // floats of scratch
    const int64_t mb = M < GPTQ_MB ? M : GPTQ_MB;
    return M * G + (int64_t)nthreads * (ordered ? 2 * mb * N : mb * G * N);
}

// N % lq_gptq_tile() == 0 (the caller checks); work: lq_gptq_work(...) floats. Threads split qweight by rows (each
// streams its own part of the matrix, whole rows at a time) and add their partial results at the end.
void lq_gptq_gemm(const float *x, int64_t M, int64_t K, const int32_t *qweight, int64_t N, const int32_t *qzeros,
                  const uint16_t *scales, const int32_t *g_idx, int ordered, int64_t group_size, int64_t G, int bits,
                  float *y, float *work, int nthreads) {
    const int lp = gptq_lp(bits);
    const int64_t zcols = (N * bits + 31) / 32, rows = K >> lp;
    float *xsum = work, *part = work + M * G;
    memset(xsum, 0, M * G * sizeof(float));
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xsum[m * G + g_idx[k]] += x[m * K + k];
    int nt = nthreads_for(N * K * M, nthreads);
    if (ordered && nt > G) nt = (int)G;
    const int64_t mbmax = M < GPTQ_MB ? M : GPTQ_MB, stride = ordered ? 2 * mbmax * N : mbmax * G * N;
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int64_t tid = 0, nth = 1;
#endif
        float *mine = part + tid * stride;
        const int64_t c0 = N * tid / nth / V * V, c1 = N * (tid + 1) / nth / V * V;  // this thread's columns to sum
        for (int64_t m0 = 0; m0 < M; m0 += GPTQ_MB) {
            const int mb = (int)(M - m0 < GPTQ_MB ? M - m0 : GPTQ_MB);
            if (ordered) {
                float *yp = mine + mbmax * N;
                const int64_t g0 = G * tid / nth, g1 = G * (tid + 1) / nth;
                memset(yp, 0, mb * N * sizeof(float));
#define RUN(MB) gptq_ordered(x + m0 * K, MB, K, qweight, N, g0, g1, qzeros, scales, group_size, G, bits, xsum + m0 * G, \
                             mine, yp)
                BY_ROWS(mb, RUN);
#undef RUN
#pragma omp barrier
                const int64_t e1 = tid == nth - 1 ? N : c1;
                for (int64_t m = 0; m < mb; m++)
                    for (int64_t c = c0; c < e1; c++) {
                        float sum = 0.0f;
                        for (int64_t t = 0; t < nth; t++) sum += part[t * stride + mbmax * N + m * N + c];
                        y[(m0 + m) * N + c] = sum;
                    }
            } else {
                const int64_t r0 = rows * tid / nth, r1 = rows * (tid + 1) / nth;
                memset(mine, 0, mb * G * N * sizeof(float));
#define RUN(MB) gptq_any_order(x + m0 * K, MB, K, qweight, N, r0, r1, g_idx, G, bits, mine)
                BY_ROWS(mb, RUN);
#undef RUN
#pragma omp barrier
                const int64_t e1 = tid == nth - 1 ? N : c1;
                for (int64_t m = 0; m < mb; m++) {
                    float *ym = y + (m0 + m) * N;
                    for (int64_t c = c0; c < e1; c++) ym[c] = 0.0f;
                    for (int64_t g = 0; g < G; g++) {
                        const float xs = xsum[(m0 + m) * G + g];
                        for (int64_t c = c0; c < e1; c += V) {
                            vf a = vzero();
                            for (int64_t t = 0; t < nth; t++) a = vadd(a, vload(part + t * stride + (m * G + g) * N + c));
                            const vf s = vhalf(scales + g * N + c), z = vzeros(qzeros + g * zcols, c, bits, lp);
                            vstore(ym + c, vfma(s, vsub(a, vmul(z, vset1(xs))), vload(ym + c)));
                        }
                    }
                }
            }
#pragma omp barrier
        }
    }
}

int lq_gptq_tile(void) { return V; }

// columns [n0, n1) of W^T (K rows of n1 - n0 values, input channels in their original order) into out: the
// direction qweight is stored in, so the reads are contiguous and vectorised. s * (q - z) in fp32, as
// gptq_format.dequantize computes it. n0 and n1 are multiples of V.
void lq_gptq_dequant_t(const int32_t *qweight, int64_t N, int64_t K, const int32_t *qzeros, const uint16_t *scales,
                       const int32_t *g_idx, int bits, int64_t n0, int64_t n1, void *out, int out_bf16,
                       int nthreads) {
    const int lp = gptq_lp(bits), mask = (1 << bits) - 1;
    const int64_t zcols = (N * bits + 31) / 32, nc = n1 - n0;
#pragma omp parallel num_threads(nthreads_for(nc * K, nthreads))
    {
        float *v = malloc(nc * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; k++) {
            const int64_t g = g_idx[k];
            const int32_t *wrow = qweight + (k >> lp) * N;
            const int sh = bits * (int)(k & ((1 << lp) - 1));
            for (int64_t c = n0; c < n1; c += V) {
                const vf q = vbits(vloadi(wrow + c), sh, mask);
                const vf z = vzeros(qzeros + g * zcols, c, bits, lp);
                vstore(v + c - n0, vmul(vhalf(scales + g * N + c), vsub(q, z)));
            }
            store_row(out, k, nc, v, out_bf16);
        }
        free(v);
    }
}

// ---- GPTQ, the algorithm: one lazy-update block of columns -------------------------------------------------
// W1 holds `count` columns of the weight (column c at W1 + c * ld, `rows` values each), in processing order. Each
// column in turn is put on its group's grid (q = clamp(round(w / scale) + zero, 0, maxq)), its error divided by
// the inverse Hessian's diagonal goes to Err, and every later column of the block takes the OBS update
// W1[:, c] -= err * Hinv1[i, c]. Rows never interact, so threads split the rows. A group's grid is computed from
// its columns as they are when it starts (gs > 0: every gs columns from the first), or given per column
// (col_group: index into the `table_*` grids, static groups), or stays the one passed in (scale/zero).
// Arithmetic as gptq.py's quant_params / quantize_to_grid / the OBS step, in fp32.

#define FP16_TINY 5.9604644775390625e-08f
#define FP16_MAX 65504.0f

static float round_fp16(float x) {  // to the nearest fp16 value (ties to even), back in fp32; x in fp16 range
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
#else
    uint32_t u;
    memcpy(&u, &x, 4);
    int e = (int)((u >> 23) & 0xFF) - 127;
    if (e < -14) {  // fp16 subnormal: a multiple of 2^-24
        float r = __builtin_nearbyintf(x * 16777216.0f) / 16777216.0f;
        return r;
    }
    uint32_t drop = 13, half = 1u << (drop - 1), mask = (1u << drop) - 1, rest = u & mask;
    u &= ~mask;
    if (rest > half || (rest == half && (u & (1u << drop)))) u += 1u << drop;
    memcpy(&x, &u, 4);
    return x;
#endif
}

static void gptq_grid_row(const float *W1, int64_t ld, int64_t r, int64_t c0, int64_t n, int maxq, int sym,
                          float *scale, float *zero) {
    float xmin = 0.0f, xmax = 0.0f;
    for (int64_t c = c0; c < c0 + n; c++) {
        const float v = W1[c * ld + r];
        xmin = v < xmin ? v : xmin;
        xmax = v > xmax ? v : xmax;
    }
    if (sym) {
        xmax = -xmin > xmax ? -xmin : xmax;
        xmin = -xmax;
    }
    if (xmin == 0.0f && xmax == 0.0f) {
        xmin = -1.0f;
        xmax = 1.0f;
    }
    float s = (xmax - xmin) / (float)maxq;
    s = s < FP16_TINY ? FP16_TINY : (s > FP16_MAX ? FP16_MAX : s);
    s = round_fp16(s);
    float z;
    if (sym) {
        z = (float)((maxq + 1) / 2);
    } else {
        z = __builtin_nearbyintf(-xmin / s);
        z = z < 1.0f ? 1.0f : (z > (float)maxq ? (float)maxq : z);
    }
    *scale = s;
    *zero = z;
}

#define GPTQ_SUB 8
// w[c] -= e[i] * Hinv1[i, c] for the sub-block's columns i in [i0, i1), in that order, for every later column c
static void gptq_sub_update(float *W1, int64_t ld, const float *Err, const float *Hinv1, int64_t ldh, int64_t i0,
                            int64_t i1, int64_t count, int64_t r0, int64_t r1) {
    const int64_t n = i1 - i0;
    for (int64_t c = i1; c < count; c++) {
        float *wc = W1 + c * ld, h[GPTQ_SUB];
        for (int64_t i = 0; i < n; i++) h[i] = Hinv1[(i0 + i) * ldh + c];
        int64_t r = r0;
        for (; r + V <= r1; r += V) {
            vf v = vload(wc + r);
            for (int64_t i = 0; i < n; i++) v = vsub(v, vmul(vload(Err + (i0 + i) * ld + r), vset1(h[i])));
            vstore(wc + r, v);
        }
        for (; r < r1; r++) {
            float v = wc[r];
            for (int64_t i = 0; i < n; i++) v -= Err[(i0 + i) * ld + r] * h[i];
            wc[r] = v;
        }
    }
}

void lq_gptq_columns(float *W1, int64_t ld, int64_t rows, int64_t count, const float *Hinv1, int64_t ldh, float *Q,
                     float *Err, float *scale, float *zero, float *new_scales, float *new_zeros, int64_t gs,
                     const int64_t *col_group, const float *table_scale, const float *table_zero, int bits, int sym,
                     double *loss, int nthreads) {
    const int maxq = (1 << bits) - 1;
    double total = 0.0;
#pragma omp parallel num_threads(nthreads_for(rows * count * 16, nthreads)) reduction(+ : total)
    {
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int64_t tid = 0, nth = 1;
#endif
        const int64_t r0 = rows * tid / nth, r1 = rows * (tid + 1) / nth;
        // Columns go in sub-blocks of S: each column updates the rest of its sub-block at once, and the block's
        // columns after it once per sub-block, S errors at a time in registers (each element still sees the
        // same subtractions in the same order: bit-identical). S divides gs, so a group's grid is computed at
        // the start of a sub-block, from columns that have every earlier update.
        const int64_t S = (col_group != NULL || gs == 0 || gs % GPTQ_SUB == 0) ? GPTQ_SUB : 1;
        for (int64_t i = 0; i < count; i++) {
            const int64_t s1 = (i / S + 1) * S < count ? (i / S + 1) * S : count;  // end of i's sub-block
            const float *s = scale, *z = zero;
            if (col_group != NULL) {
                s = table_scale + col_group[i] * rows;
                z = table_zero + col_group[i] * rows;
            } else if (gs > 0 && i % gs == 0) {
                for (int64_t r = r0; r < r1; r++)
                    gptq_grid_row(W1, ld, r, i, gs < count - i ? gs : count - i, maxq, sym, scale + r, zero + r);
                memcpy(new_scales + (i / gs) * rows + r0, scale + r0, (r1 - r0) * sizeof(float));
                memcpy(new_zeros + (i / gs) * rows + r0, zero + r0, (r1 - r0) * sizeof(float));
            }
            const float d = Hinv1[i * ldh + i];
            float *w = W1 + i * ld, *q = Q + i * ld, *e = Err + i * ld;
            for (int64_t r = r0; r < r1; r++) {
                float v = __builtin_nearbyintf(w[r] / s[r]) + z[r];
                v = v < 0.0f ? 0.0f : (v > (float)maxq ? (float)maxq : v);
                q[r] = v;
                const float err = (w[r] - s[r] * (v - z[r])) / d;
                e[r] = err;
                total += (double)err * err;
            }
            for (int64_t c = i + 1; c < s1; c++) {  // OBS update of the sub-block's later columns
                const float h = Hinv1[i * ldh + c];
                float *wc = W1 + c * ld;
                for (int64_t r = r0; r < r1; r++) wc[r] -= e[r] * h;
            }
            if (i + 1 == s1) gptq_sub_update(W1, ld, Err, Hinv1, ldh, i - i % S, s1, count, r0, r1);
        }
    }
    *loss = total;
}

// ---- GPTQ's Hessian from bf16 activations -----------------------------------------------------------------------
// H[i, j] = beta * H[i, j] + alpha * sum_k x[k, i] x[k, j] for the tiles of the upper triangle (a few entries below
// the diagonal are written too; the caller reads the upper triangle only). x is bf16 [K, N], packed by the caller as
// P[c][p][l] = (x[2p, 16c + l], x[2p + 1, 16c + l]) in one 32-bit word: panels of 16 columns, row pairs, N padded
// to a multiple of 32 and K to an even count with zeros. VDPBF16PS multiplies bf16 pairs exactly and accumulates in
// fp32, so this is the fp32 Hessian of the same activations (summed in another order), at the bf16 rate.
#define GRAM_MR 8     // rows of H per tile: broadcasts from half a panel
#define GRAM_NR 32    // columns of H per tile: two panels, two accumulators per row
#define GRAM_KC 512   // row pairs per pass over a tile (the tile's two panels stay in L2)
int lq_bf16_gram_ok(void) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

void lq_bf16_gram(const uint32_t *P, int64_t K2, int64_t Np, int64_t N, float *H, int64_t ldh, float beta,
                  float alpha, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    const int64_t ntj = Np / GRAM_NR;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads_for(K2 * Np * Np / 2, nthreads))
    for (int64_t t = 0; t < ntj; t++) {
        const int64_t jt = ntj - 1 - t;  // widest tile columns first: they have the most tiles
        const int64_t j0 = jt * GRAM_NR;
        const uint32_t *B0 = P + (j0 / 16) * K2 * 16, *B1 = B0 + K2 * 16;
        const __mmask16 m0 = j0 + 16 <= N ? 0xFFFF : (j0 >= N ? 0 : (__mmask16)((1u << (N - j0)) - 1));
        const __mmask16 m1 = j0 + 32 <= N ? 0xFFFF : (j0 + 16 >= N ? 0 : (__mmask16)((1u << (N - j0 - 16)) - 1));
        for (int64_t i0 = 0; i0 < j0 + GRAM_NR && i0 < N; i0 += GRAM_MR) {
            const uint32_t *A = P + (i0 / 16) * K2 * 16 + (i0 % 16);
            for (int64_t p0 = 0; p0 < K2; p0 += GRAM_KC) {
                const int64_t p1 = p0 + GRAM_KC < K2 ? p0 + GRAM_KC : K2;
                __m512 c[GRAM_MR][2];
                for (int r = 0; r < GRAM_MR; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
                for (int64_t p = p0; p < p1; p++) {
                    const __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void *)(B0 + p * 16));
                    const __m512bh b1 = (__m512bh)_mm512_loadu_si512((const void *)(B1 + p * 16));
                    const uint32_t *a = A + p * 16;
                    for (int r = 0; r < GRAM_MR; r++) {
                        const __m512bh ar = (__m512bh)_mm512_set1_epi32((int)a[r]);
                        c[r][0] = _mm512_dpbf16_ps(c[r][0], ar, b0);
                        c[r][1] = _mm512_dpbf16_ps(c[r][1], ar, b1);
                    }
                }
                const float bt = p0 == 0 ? beta : 1.0f;
                for (int r = 0; r < GRAM_MR && i0 + r < N; r++) {
                    float *h = H + (i0 + r) * ldh + j0;
                    const __m512 h0 = _mm512_maskz_loadu_ps(m0, h), h1 = _mm512_maskz_loadu_ps(m1, h + 16);
                    _mm512_mask_storeu_ps(h, m0, _mm512_fmadd_ps(c[r][0], _mm512_set1_ps(alpha), _mm512_mul_ps(h0, _mm512_set1_ps(bt))));
                    _mm512_mask_storeu_ps(h + 16, m1, _mm512_fmadd_ps(c[r][1], _mm512_set1_ps(alpha), _mm512_mul_ps(h1, _mm512_set1_ps(bt))));
                }
            }
        }
    }
#else
    (void)P; (void)K2; (void)Np; (void)N; (void)H; (void)ldh; (void)beta; (void)alpha; (void)nthreads;
#endif
}

// The same Hessian update from fp32 activations (any build): x packed by the caller as P[c][k][l] = x[k, V c + l],
// panels of V columns, N padded to a multiple of 48 with zeros. MR x 3V tiles of fp32 FMAs (24 accumulators on
// AVX-512 and AVX2), upper tiles only: the n^2/2 products of a symmetric rank-k update, where a GEMM computes n^2.
#define GRAM_KC32 256  // rows per pass over a tile
void lq_f32_gram(const float *P, int64_t K, int64_t Np, int64_t N, float *H, int64_t ldh, float beta, float alpha,
                 int nthreads) {
    const int64_t NR = 3 * V, ntj = Np / NR;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads_for(K * Np * Np / 2, nthreads))
    for (int64_t t = 0; t < ntj; t++) {
        const int64_t j0 = (ntj - 1 - t) * NR;  // widest tile columns first: they have the most tiles
        const float *B = P + (j0 / V) * K * V;   // three consecutive panels
        for (int64_t i0 = 0; i0 < j0 + NR && i0 < N; i0 += GRAM_MR) {
            const float *a[GRAM_MR];  // row r of the tile is column i0 + r of x: a[r][k * V]
            for (int r = 0; r < GRAM_MR; r++) a[r] = P + ((i0 + r) / V) * K * V + (i0 + r) % V;
            for (int64_t k0 = 0; k0 < K; k0 += GRAM_KC32) {
                const int64_t k1 = k0 + GRAM_KC32 < K ? k0 + GRAM_KC32 : K;
                vf c[GRAM_MR][3];
                for (int r = 0; r < GRAM_MR; r++) c[r][0] = c[r][1] = c[r][2] = vzero();
                for (int64_t k = k0; k < k1; k++) {
                    const float *bk = B + k * V;
                    const vf b0 = vload(bk), b1 = vload(bk + K * V), b2 = vload(bk + 2 * K * V);
#if V >= GRAM_MR  // the tile's rows sit in one panel (i0 % 8 == 0): one pointer
                    const float *ak = a[0] + k * V;
#define GRAM_A(r) ak[r]
#else
#define GRAM_A(r) a[r][k * V]
#endif
                    for (int r = 0; r < GRAM_MR; r++) {
                        const vf ar = vset1(GRAM_A(r));
                        c[r][0] = vfma(ar, b0, c[r][0]);
                        c[r][1] = vfma(ar, b1, c[r][1]);
                        c[r][2] = vfma(ar, b2, c[r][2]);
                    }
#undef GRAM_A
                }
                const float bt = k0 == 0 ? beta : 1.0f;
                for (int r = 0; r < GRAM_MR && i0 + r < N; r++) {
                    float *h = H + (i0 + r) * ldh + j0;
                    if (j0 + NR <= N) {
                        for (int q = 0; q < 3; q++)
                            vstore(h + q * V, vfma(c[r][q], vset1(alpha), vmul(vload(h + q * V), vset1(bt))));
                    } else {
                        float tmp[3 * V];
                        for (int q = 0; q < 3; q++) vstore(tmp + q * V, c[r][q]);
                        for (int64_t j = 0; j0 + j < N; j++) h[j] = bt * h[j] + alpha * tmp[j];
                    }
                }
            }
        }
    }
}
